"""Patient history as a private, per-patient knowledge pack (issue 9, part 2).

`medrwr-edge history add KEY notes.txt` turns a patient's notes, reports (as text) and DICOM structured reports
into passages, embeds them with the installed text encoder and stores them, encrypted, under
`data_dir()/history/<opaque id>/`. `ask --history KEY` searches that history beside the knowledge packs; every
retrieved passage says where it came from, and `history delete KEY` removes the history and every logged answer
that used it.

    crypto.py     the per-install secret, opaque ids (HMAC-SHA256 of the key), AES-256-GCM sealing
    sources.py    .txt/.md/.text and DICOM SR files -> passages (never patient identifiers)
    store.py      add / list / show / delete, and opening a history as an in-memory kb_pack `Pack`
    retrieval.py  searching a history beside the knowledge packs (one reserved slot)
    cli.py        `medrwr-edge history ...`
"""
