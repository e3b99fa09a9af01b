"""What of a retrieved entry guided and rag splice: the lines a question is about, not just the entry's head."""

from medrwr_edge.kb_pack.icd10 import icd10_document
from medrwr_edge.runtime.excerpt import ELLIPSIS, first_words, focus_excerpt, focus_terms

J84_QUESTION = ("ICD-10-CM category J84 (Other interstitial pulmonary diseases) carries an Excludes1 note. "
                "Which of these conditions is NOT coded under J84?")
J84_OPTIONS = ("Pulmonary alveolar microlithiasis\nInterstitial emphysema\nIdiopathic pulmonary hemosiderosis\n"
               "Other alveolar and parieto-alveolar conditions")


def test_the_excludes1_note_a_question_asks_about_is_kept_where_the_first_words_cut_it():
    text = icd10_document("J84").text
    head = first_words(text, 40)
    focus = focus_excerpt(text, focus_terms(J84_QUESTION, J84_OPTIONS), 40)
    assert "interstitial emphysema" not in head  # the note is past the entry's first 40 words
    assert "Excludes1 (never coded together with this code): " in focus and "interstitial emphysema (J98.2)" in focus
    assert focus.startswith("ICD-10-CM J84: Other interstitial pulmonary diseases ")  # the title line always leads
    assert len(focus.split()) <= 40 + 2 and "\n" not in focus and focus.endswith(ELLIPSIS)
    # shown in the entry's own order: subdivisions come before the Excludes1 note in the entry
    assert focus.index("Subdivisions") < focus.index("Excludes1")


def test_a_list_line_too_long_keeps_its_label_and_the_matching_items():
    text = "T1: Title\nItems: alpha one; beta two; gamma three; delta four; epsilon five\nOther: unrelated words here"
    out = focus_excerpt(text, focus_terms("which is delta", ""), 8)
    assert out.startswith("T1: Title Items: ") and "delta four" in out and out.endswith(ELLIPSIS)
    assert out.index("delta") < out.index(ELLIPSIS) and len(out.split()) <= 8 + 2


def test_without_focus_terms_or_a_budget_it_is_the_head_or_the_whole_text():
    text = icd10_document("C75.9").text
    assert focus_excerpt(text, {}, 40) == first_words(text, 40)
    assert focus_excerpt(text, focus_terms("anything", ""), 0) == text  # 0: whole entries (unchanged)
    assert focus_excerpt("short entry", focus_terms("entry", ""), 40) == "short entry"
    assert first_words("a b c d", 2) == f"a b {ELLIPSIS}"


def test_title_words_do_not_pull_hierarchy_lines_ahead_of_the_notes():
    # The code-to-description question's words are the title's: no other line outranks the entry's order.
    text = icd10_document("C75.9").text
    q = "In ICD-10-CM, which condition does code C75.9 denote?"
    opts = "Malignant neoplasm of endocrine gland, unspecified\nMalignant neoplasm of pituitary gland"
    out = focus_excerpt(text, focus_terms(q, opts), 40)
    assert out.split(" Block ")[0].endswith("Category C75: Malignant neoplasm of other endocrine glands and related "
                                           "structures")


def test_a_long_matching_line_does_not_crowd_out_the_note_the_question_asks_about():
    # M30's options are its subdivisions but one: that one is in the Excludes1 note, after the subdivisions, and the
    # subdivisions match the options' words too. Matching items are taken in rounds, so both lines are shown.
    text = icd10_document("M30").text
    q = ("ICD-10-CM category M30 (Polyarteritis nodosa and related conditions) carries an Excludes1 note. "
         "Which of these conditions is NOT coded under M30?")
    opts = ("Other conditions related to polyarteritis nodosa\nJuvenile polyarteritis\n"
            "Polyarteritis with lung involvement [Churg-Strauss]\nMicroscopic polyarteritis")
    out = focus_excerpt(text, focus_terms(q, opts), 40)
    assert "Excludes1 (never coded together with this code): microscopic polyarteritis (M31.7)" in out
    assert "Juvenile polyarteritis" in out and "Polyarteritis with lung involvement [Churg-Strauss]" in out
    assert len(out.split()) <= 40 + 2 and out.index("Subdivisions") < out.index("Excludes1")


def test_a_prose_line_longer_than_the_budget_is_cut_to_its_first_words():
    text = "Title line\n" + " ".join(f"w{i}" for i in range(60)) + " keyword\nshort other line"
    out = focus_excerpt(text, focus_terms("keyword", ""), 12)
    assert out.startswith("Title line w0 w1") and out.endswith(ELLIPSIS) and len(out.split()) <= 12 + 3
