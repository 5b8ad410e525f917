#!/usr/bin/env python3
# Usage: bench/gen-tree.py DIR FILES MIB SEED
# The size and kind distribution of `kairos-sim tree` (text configs and logs, random binary
# data, a few large binaries), for machines where kairos-sim is not built.
import math, os, random, sys
d, files, mib, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
WORDS = "listen server worker timeout max_connections cache_size port host user log level debug info path root upstream proxy buffer keepalive".split()
def text(n):
    out = []; size = 0; line = 0
    while size < n:
        line += 1
        parts = [f"{line:06} "] + [rng.choice(WORDS) + ("=" if rng.random() < 0.2 else " ") for _ in range(rng.randrange(4, 12))] + [f"{rng.randrange(100000)}\n"]
        s = "".join(parts); out.append(s); size += len(s)
    return "".join(out).encode()[:n]
sizes = []
for i in range(files):
    c = i % 100
    lo, hi = (200.0, 16000.0) if c < 70 else ((16000.0, 400000.0) if c < 97 else (1e6, 2e7))
    sizes.append(math.exp(math.log(lo) + rng.random() * (math.log(hi) - math.log(lo))))
scale = mib * 1048576 / sum(sizes)
for i, s in enumerate(sizes):
    n = max(1, int(s * scale)); g = i % 64; sub = (i // 64) % 8
    if i % 100 >= 97 or i % 3 == 0:
        name, content = f"data/g{g:02}/s{sub}/blob-{i:06}.bin", os.urandom(n)
    elif i % 3 == 1:
        name, content = f"conf/g{g:02}/s{sub}/svc-{i:06}.conf", text(n)
    else:
        name, content = f"logs/g{g:02}/s{sub}/app-{i:06}.log", text(n)
    p = os.path.join(d, name); os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f: f.write(content)
