# Deletes JetStream streams whose names start with any of the given prefixes (raw protocol).
import socket, json, sys, time
prefixes = [p.upper() for p in sys.argv[1:]]
s = socket.create_connection(("127.0.0.1", 4222)); f = s.makefile("rb")
f.readline()
s.sendall(b'CONNECT {"verbose":false,"headers":true}\r\nSUB _INBOX.c 1\r\n')
def req(subj, body=b""):
    s.sendall(b"PUB %s _INBOX.c %d\r\n%s\r\n" % (subj.encode(), len(body), body))
    while True:
        line = f.readline()
        if line.startswith(b"PING"): s.sendall(b"PONG\r\n"); continue
        if line.startswith(b"MSG") or line.startswith(b"HMSG"):
            n = int(line.split()[-1]); data = f.read(n + 2)[:-2]
            return json.loads(data[data.find(b"{"):])
names, offset = [], 0
while True:
    r = req("$JS.API.STREAM.NAMES", json.dumps({"offset": offset}).encode())
    got = r.get("streams") or []
    names += got; offset += len(got)
    if not got or offset >= r.get("total", 0): break
for n in names:
    if any(n.startswith(p) or n.startswith("KV_" + p) for p in prefixes):
        req("$JS.API.STREAM.DELETE." + n); print("deleted", n)
print("streams left:", len(names) - sum(1 for n in names if any(n.startswith(p) or n.startswith("KV_"+p) for p in prefixes)))
