"""Whether two `dclsify predict --json` outputs give the same sounds in the same order with the same
scores (to 1e-4: a baked kernel's `auto` algorithm is timed per run, and may differ in the last bits)."""

import json
import sys

first, second = ([json.loads(line) for line in open(path)] for path in sys.argv[1:3])
differ = [
    a["source"]
    for a, b in zip(first, second, strict=False)
    if a["source"] != b["source"]
    or a.get("error") != b.get("error")
    or any(
        abs(x["score"] - y["score"]) > 1e-4 or x["label"] != y["label"]
        for x, y in zip(a.get("labels", []), b.get("labels", []), strict=True)
    )
]
if len(first) != len(second):
    differ.append(f"{len(first)} against {len(second)} sounds")
print(f"{len(first)} sounds: " + (f"{len(differ)} differ, the first {differ[0]}" if differ else "the same scores"))
sys.exit(int(bool(differ)))
