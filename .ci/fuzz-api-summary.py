"""Per operation: the test cases schemathesis sent and how many failed a check, from its
NDJSON events (`--report ndjson`). Usage: fuzz-api-summary.py RUN EVENTS.ndjson.
Exits 1 if any case failed or any operation errored."""

import collections
import json
import sys

run, path = sys.argv[1:3]
cases = collections.Counter()
failed = collections.Counter()
errors = collections.Counter()
for line in open(path, encoding="utf-8"):
    event = json.loads(line)
    kind, body = next(iter(event.items()))
    if kind == "NonFatalError":
        errors[body.get("label") or "?"] += 1
    if kind != "ScenarioFinished":
        continue
    recorder = body.get("recorder") or {}
    label = recorder.get("label") or body.get("label") or "?"
    cases[label] += len(recorder.get("cases") or {})
    for checks in (recorder.get("checks") or {}).values():
        if any(str(c.get("status", "")).lower() == "failure" for c in checks):
            failed[label] += 1

width = max([len(op) for op in cases] + [9])
print(f"[{run}] {'OPERATION':<{width}}  EXAMPLES  FAILED")
for op in sorted(cases):
    print(f"[{run}] {op:<{width}}  {cases[op]:>8}  {failed[op]:>6}")
print(f"[{run}] {len(cases)} operations, {sum(cases.values())} examples, "
      f"{sum(failed.values())} failed, {sum(errors.values())} errors")
sys.exit(1 if failed or errors else 0)
