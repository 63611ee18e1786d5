# Every delivery of every simulated customer, as History lists it (last stage), against the
# Delivery service's record. Usage: check.py API
import json, sys, urllib.request, urllib.parse
api = sys.argv[1]
def get(path):
    with urllib.request.urlopen(api + path, timeout=10) as r:
        return json.load(r)
total, differ, missing, stages = 0, [], 0, {}
for c in range(1000):
    owner = f"customer-{c}"; cursor = None
    while True:
        q = {"owner": owner, "limit": 500}
        if cursor: q["after"] = cursor
        page = get("/v1/history?" + urllib.parse.urlencode(q))
        for d in page.get("deliveries", []):
            total += 1
            try:
                rec = get(f"/v1/deliveries/{d['delivery_id']}")
            except Exception as e:
                missing += 1; continue
            stages[rec["stage"]] = stages.get(rec["stage"], 0) + 1
            if rec["stage"] != d.get("stage"):
                differ.append((d["delivery_id"], rec["stage"], d.get("stage")))
        cursor = page.get("next")
        if not cursor: break
print(f"deliveries listed by history: {total}; records missing: {missing}; stages: {stages}")
print(f"record stage != history's last stage: {len(differ)} {differ[:5]}")
