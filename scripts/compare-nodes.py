# Every delivery in the shared PostgreSQL store (schema argv[1]), read through node A (port
# 18080) and node B (28080): the same stage on both? And each against its history's last stage.
import json, sys, urllib.request, subprocess
schema = sys.argv[1]
rows = subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-At", "-c",
    f"select convert_from(key, 'UTF8') from {schema}.service_kv where key like 'deliveries/%'::bytea"], capture_output=True, text=True).stdout.split()
ids = [int(k.split('/')[1]) for k in rows]
def get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return json.load(r)
    except Exception as e:
        return {"error": str(e)}
differ, stages, hist_differ = [], {}, []
for i in ids:
    a, b = get(18080, f"/v1/deliveries/{i}"), get(28080, f"/v1/deliveries/{i}")
    if a.get("stage") != b.get("stage") or a.get("stage") is None:
        differ.append((i, a.get("stage"), b.get("stage")))
    stages[a.get("stage")] = stages.get(a.get("stage"), 0) + 1
    h = get(28080, f"/v1/deliveries/{i}/history")
    evs = h.get("events") or []
    if not evs or evs[-1]["stage"] != a.get("stage"):
        hist_differ.append((i, a.get("stage"), evs[-1]["stage"] if evs else None))
print(f"deliveries in the shared store: {len(ids)}, ids distinct: {len(set(ids)) == len(ids)}")
print(f"stages (node a): {stages}")
print(f"read differently by the two nodes: {len(differ)} {differ[:5]}")
print(f"stage differs from history's last: {len(hist_differ)} {hist_differ[:5]}")
