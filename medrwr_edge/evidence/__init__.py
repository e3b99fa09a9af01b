"""Evidence a clinician can read and an auditor can replay.

- `report.write_report(record, path, images=[...])`: a self-contained HTML page (no external assets).
- `log.append_record(record, command)` / `log.log_answer(...)`: the SQLite answer log in the data directory;
  `log.logging_enabled(no_log)` says whether logging is on (`MEDRWR_EDGE_NO_LOG=1` or `--no-log` turn it off).
- `replay.replay(record, images)`: verify hashes, answer again with the recorded settings, compare token for token.
- `medrwr_edge/data/evidence.schema.json`: the JSON Schema of the evidence record (`record_io.load_schema()`).
"""
