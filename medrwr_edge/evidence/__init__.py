"""Evidence a clinician can read and an auditor can replay.

- `report.write_report(record, path, images=[...])`: a self-contained HTML page (no external assets).
- `log.append_record(record, command)` / `log.finish_answer(...)`: the SQLite answer log in the data directory;
  `log.logging_enabled(no_log)` says whether logging is on (`MEDRWR_EDGE_NO_LOG=1` or `--no-log` turn it off).
- `replay.replay(record, images)`: verify hashes, answer again with the recorded settings, compare token for token.
- `record.py`: the evidence record's dataclasses, and reading it back (JSON, stdin, the log) with its checks;
  its JSON Schema is `medrwr_edge/data/evidence.schema.json` (`record.load_schema()`).
- `privacy.py`: what an answer keeps of its patient when it is logged, saved or compared.
"""
