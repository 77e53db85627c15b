#!/usr/bin/env python3
"""Writes the seed corpora of memlab-fuzz's targets into Fuzz/corpus/<target>/.

Seeds are small, deterministic and named for what the replay test checks: `ok-*` must be
accepted by its target, `bad-*` refused (docs/reliability.md, "Fuzzing"). Findings stored as
regression seeds (`crash-*`, `bad-*` added by hand after a fix) are not touched here: run this
after changing a format, then check `git status`.
"""
import os, struct, sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")

def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

def fnv(data):
    h = 0xcbf29ce484222325
    for i in range(0, len(data) // 8 * 8, 8):
        h ^= struct.unpack_from("<Q", data, i)[0]
        h = (h * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h

# ---- migration: role byte, then frames (magic "ML", type, flags, u32 length, payload) ----
def frame(t, p, flags=0):
    return b"ML" + bytes([t, flags]) + struct.pack("<I", len(p)) + p

HELLO, WELCOME, REFUSE, PAGES, ROUND_END, ROUND_ACK, FINISH, RESUMED, VERIFY, VERIFIED, ERROR, PING, PONG = range(1, 14)

def header(region=16384, page=4096, flags="fpu sse2", arch="x86_64", model="seed", extra="", checksum="0"):
    return (f"arch={arch}\npage_size={page}\ncpu_model={model}\ncpu_flags={flags}\n"
            f"region_bytes={region}\nchecksum={checksum}\n{extra}").encode()

def hello(version=1, **kw):
    return frame(HELLO, struct.pack("<I", version) + header(**kw))

def pages(idx, fill):
    return frame(PAGES, struct.pack("<I", len(idx)) + b"".join(struct.pack("<Q", i) for i in idx)
                 + b"".join(bytes([f]) * 4096 for f in fill))

def u64(t, v): return frame(t, struct.pack("<Q", v))

region = bytearray(16384)
region[0:4096] = b"\x11" * 4096
region[12288:16384] = b"\x33" * 4096
region[4096:8192] = b"\x22" * 4096
good_run = (frame(PING, struct.pack("<Q", 0)) + pages([0, 3], [0x11, 0x33])
            + frame(ROUND_END, struct.pack("<II", 1, 2)) + pages([1], [0x22]) + u64(FINISH, 3)
            + u64(VERIFY, fnv(bytes(region))))
write("migration", "ok-dest-one-round-and-stop-copy", b"\x00" + hello() + good_run)
write("migration", "ok-dest-ignored-cpu-flag", b"\x02" + hello(flags="fpu avx512f") + good_run)
write("migration", "bad-dest-missing-cpu-flag", b"\x00" + hello(flags="fpu avx512f") + good_run)
write("migration", "bad-dest-page-index-2pow63", b"\x00" + hello() + pages([1 << 63], [1]))
write("migration", "bad-dest-finish-count-2pow64-1", b"\x00" + hello() + u64(FINISH, (1 << 64) - 1))
write("migration", "bad-dest-round-skipped", b"\x00" + hello() + frame(ROUND_END, struct.pack("<II", 5, 0)))
write("migration", "bad-dest-round-more-pages-than-region", b"\x00" + hello() + pages([0, 1, 2], [1, 1, 1]) + pages([0, 1], [1, 1]))
write("migration", "bad-dest-verify-wrong-checksum", b"\x00" + hello() + u64(FINISH, 0) + u64(VERIFY, 1))
write("migration", "bad-dest-over-cap", b"\x00" + hello(region=2 << 20))

# ENCODED_PAGES (14): u32 n, then per page u64 index, u8 kind (0 raw, 1 zero, 2 XBZRLE,
# 3 zstd, 4 unchanged), u32 length, data.
ENCODED = 14
def enc(*recs):
    return frame(ENCODED, struct.pack("<I", len(recs)) + b"".join(struct.pack("<QBI", i, k, len(d)) + d for i, k, d in recs))
eregion = bytearray(16384)
eregion[0:4096] = b"\x44" * 8 + b"\x11" * 4088
eregion[8192:12288] = b"\x22" * 4096
eregion[12288:16384] = b"\x33" * 4096
encoded_run = (enc((0, 0, b"\x11" * 4096), (1, 1, b""), (3, 0, b"\x33" * 4096))
               + frame(ROUND_END, struct.pack("<II", 1, 3))
               + enc((0, 2, b"\x00\x08" + b"\x44" * 8), (2, 0, b"\x22" * 4096), (3, 4, b""))
               + u64(FINISH, 6) + u64(VERIFY, fnv(bytes(eregion))))
write("migration", "ok-dest-encoded-zero-xbzrle-unchanged", b"\x00" + hello() + encoded_run)
write("migration", "bad-dest-encoded-xbzrle-past-page", b"\x00" + hello() + enc((0, 2, b"\xfa\x1f\x08" + b"\x44" * 8)))
write("migration", "bad-dest-encoded-xbzrle-truncated-run", b"\x00" + hello() + enc((0, 2, b"\x00\x20" + b"\x44" * 8)))
write("migration", "bad-dest-encoded-zstd-garbage", b"\x00" + hello() + enc((0, 3, b"\x28\xb5\x2f\xfd" + b"\x00" * 12)))
write("migration", "bad-dest-encoded-duplicate-index", b"\x00" + hello() + enc((1, 1, b""), (1, 1, b"")))
write("migration", "bad-dest-encoded-unknown-kind", b"\x00" + hello() + enc((1, 9, b"")))
# SWITCH (19): u32 port, u32 pending, u32 rate, u32 threads, u32 hot pages, bitmap (1 byte for 4 pages).
SWITCH = 19
def switch(port=4000, count=2, rate=100, threads=1, hot=4, bitmap=b"\x05"):
    return frame(SWITCH, struct.pack("<IIIII", port, count, rate, threads, hot) + bitmap)
sregion = bytearray(16384)
sregion[4096:8192] = b"\x22" * 4096
sregion[12288:16384] = b"\x33" * 4096
# Pages 1 and 3 came by pre-copy; 0 and 2 are missing (the fuzz target zeroes them: what a
# source at stop time would have had there in this seed).
write("migration", "ok-dest-hybrid-switch", b"\x00" + hello() + pages([1, 3], [0x22, 0x33]) + frame(ROUND_END, struct.pack("<II", 1, 2))
      + switch() + u64(VERIFY, fnv(bytes(sregion))))
write("migration", "bad-dest-switch-count-disagrees", b"\x00" + hello() + switch(count=3))
write("migration", "bad-dest-switch-bit-past-region", b"\x00" + hello() + switch(count=3, bitmap=b"\x15"))
write("migration", "bad-dest-switch-bitmap-short", b"\x00" + hello() + frame(SWITCH, struct.pack("<IIIII", 4000, 0, 1, 1, 1)))
write("migration", "bad-dest-switch-threads-0", b"\x00" + hello() + switch(threads=0))
write("migration", "bad-dest-switch-mid-round", b"\x00" + hello() + pages([1], [0x22]) + switch())
write("migration", "bad-dest-pages-after-switch", b"\x00" + hello() + switch() + pages([0], [0x11]))
write("migration", "bad-dest-encoded-raw-short", b"\x00" + hello() + enc((1, 0, b"\x01" * 100)))
write("migration", "bad-dest-region-near-intmax", b"\x00" + hello(region=9223372036854771712))
write("migration", "bad-dest-region-overflows-int", b"\x00" + hello(region=99999999999999999999))
write("migration", "bad-dest-page-size-not-power-of-two", b"\x00" + hello(page=3000, region=6000))
write("migration", "bad-dest-page-size-zero", b"\x00" + hello(page=0))
write("migration", "bad-dest-version-2", b"\x00" + hello(version=2))
write("migration", "bad-dest-duplicate-key", b"\x00" + hello(extra="arch=x86_64\n"))
write("migration", "bad-dest-unknown-key", b"\x00" + hello(extra="colour=blue\n"))
write("migration", "bad-dest-escape-in-model", b"\x00" + hello(model="\x1b[2Jgotcha"))
write("migration", "bad-dest-ping-100-bytes", b"\x00" + hello() + frame(PING, b"\x00" * 100))
write("migration", "bad-dest-error-with-escapes", b"\x00" + hello() + frame(ERROR, b"\x1b]0;owned\x07" + b"x" * 3000))
write("migration", "bad-dest-truncated-pages", b"\x00" + hello() + b"ML\x04\x00\xff\xff\x00\x00abc")
write("migration", "bad-dest-not-memlab", b"\x00GET / HTTP/1.0\r\n\r\n")
write("migration", "bad-dest-reserved-flags", b"\x00" + frame(HELLO, struct.pack("<I", 1) + header(), flags=1))
write("migration", "bad-dest-length-over-16MiB", b"\x00" + b"ML\x01\x00\x01\x00\x00\x01")
write("migration", "bad-dest-pages-after-finish", b"\x00" + hello() + u64(FINISH, 0) + pages([0], [1]))

acks = (frame(WELCOME, struct.pack("<I", 1)) + b"".join(u64(PONG, i) for i in range(5))
        + frame(ROUND_ACK, struct.pack("<II", 1, 256)) + u64(RESUMED, 256) + u64(VERIFIED, 0x1234))
write("migration", "ok-src-replies", b"\x01" + acks)
write("migration", "bad-src-refused", b"\x01" + frame(REFUSE, b"this CPU lacks 1 flag(s) the source had: avx512f"))
write("migration", "bad-src-pong-wrong-nonce", b"\x01" + frame(WELCOME, struct.pack("<I", 1)) + u64(PONG, 7))
write("migration", "bad-src-resumed-2pow64-1", b"\x01" + acks.replace(u64(RESUMED, 256), u64(RESUMED, (1 << 64) - 1)))
write("migration", "bad-src-welcome-long", b"\x01" + frame(WELCOME, struct.pack("<II", 1, 0)))

# ---- pagewire: role byte (0 server, 1 client), then fields ----
def pframe(t, p): return b"ML" + bytes([t, 0]) + struct.pack("<I", len(p)) + p
def get(runs): return pframe(0x21, struct.pack("<I", len(runs)) + b"".join(struct.pack("<II", a, b) for a, b in runs))

write("pagewire", "ok-server-get", b"\x00" + struct.pack("<I", 4096) + get([(0, 2), (10, 5)]))
write("pagewire", "ok-server-gets-to-the-last-page", b"\x00" + struct.pack("<I", 4096) + get([(4095, 1)]) + get([(0, 4096)]))
write("pagewire", "bad-server-run-past-the-end", b"\x00" + struct.pack("<I", 4096) + get([(4095, 2)]))
write("pagewire", "bad-server-run-u32-max", b"\x00" + struct.pack("<I", 4096) + get([(0xFFFFFFFF, 0xFFFFFFFF)]))
write("pagewire", "bad-server-empty-run", b"\x00" + struct.pack("<I", 4096) + get([(0, 0)]))
write("pagewire", "bad-server-more-than-4096-pages", b"\x00" + struct.pack("<I", 8192) + get([(0, 4096), (4096, 1)]))
write("pagewire", "bad-server-count-mismatch", b"\x00" + struct.pack("<I", 4096) + pframe(0x21, struct.pack("<IIIII", 3, 0, 1, 1, 1)))
write("pagewire", "bad-server-not-a-get", b"\x00" + struct.pack("<I", 4096) + pframe(0x22, b"\x00" * 12))
write("pagewire", "bad-server-1001-runs", b"\x00" + struct.pack("<I", 4096) + get([(0, 1)] * 1001))
hello_ok = pframe(0x20, struct.pack("<IIQ", 1, 4096, 4096))
write("pagewire", "ok-client-hello", b"\x01" + struct.pack("<Q", 4096) + hello_ok)
write("pagewire", "bad-client-hello-2pow64-1-pages", b"\x01" + struct.pack("<Q", 4096) + pframe(0x20, struct.pack("<IIQ", 1, 4096, (1 << 64) - 1)))
write("pagewire", "bad-client-hello-other-size", b"\x01" + struct.pack("<Q", 8192) + hello_ok)
write("pagewire", "bad-client-hello-version-2", b"\x01" + struct.pack("<Q", 4096) + pframe(0x20, struct.pack("<IIQ", 2, 4096, 4096)))
write("pagewire", "bad-client-hello-long", b"\x01" + struct.pack("<Q", 4096) + pframe(0x20, struct.pack("<IIQQ", 1, 4096, 4096, 0)))
write("pagewire", "bad-client-error-at-cap", b"\x01" + struct.pack("<Q", 4096) + pframe(11, b"this page source serves at most 64 connections at once"))
# ---- pagesource: `memlab _pagesource` options, NUL-separated, parsed as memlab parses them
# (swift-argument-parser), then checked. A target of its own: a parse costs milliseconds under
# the sanitizers, and sharing pagewire made its protocol checks run 300x less often. ----
def args(*a): return b"\0".join(x.encode() for x in a)
base = ["--kind=tcp", "--listen=127.0.0.1:0", "--pages=4096", "--seed=1", "--zero-ratio=0.1"]
write("pagesource", "ok-tcp", args(*base, "--ready=/tmp/r", "--parent=1", "--announce", "--max-connections=64", "--idle-timeout=60"))
write("pagesource", "ok-unix", args("--kind=unix", "--listen=/tmp/memlab-ps.sock", "--pages=1", "--seed=18446744073709551615", "--zero-ratio=1"))
write("pagesource", "ok-separate-values", args("--kind", "tcp", "--listen", "127.0.0.1:7070", "--pages", "4194304", "--seed", "0", "--zero-ratio", "0"))
write("pagesource", "bad-pages-overflow", args(*base[:2], "--pages=99999999999999999999", *base[3:]))
write("pagesource", "bad-pages-2pow62", args(*base[:2], "--pages=4611686018427387904", *base[3:]))
write("pagesource", "bad-zero-ratio-nan", args(*base[:4], "--zero-ratio=nan"))
write("pagesource", "bad-idle-inf", args(*base, "--idle-timeout=inf"))
write("pagesource", "bad-connections-0", args(*base, "--max-connections=0"))
write("pagesource", "bad-unknown", args(*base, "--colour=blue"))
write("pagesource", "bad-missing-seed", args(*base[:3], base[4]))
write("pagesource", "bad-unix-path-too-long", args("--kind=unix", "--listen=/" + "x" * 200, *base[2:]))
write("pagesource", "bad-kind-udp", args("--kind=udp", *base[1:]))
write("pagesource", "bad-seed-negative", args(*base[:3], "--seed=-1", base[4]))
write("pagesource", "bad-key-value", args("kind=tcp", "listen=127.0.0.1:0", "pages=4096", "seed=1", "zero_ratio=0.1"))
write("pagesource", "bad-help", args(*base, "--help"))

# ---- snapshot: u64 extra size, flags byte (bit 0: verify data), then the file ----
def snap(hdr, data=b"", version=1, hlen=None, magic=b"MEMLABSN"):
    return magic + struct.pack("<II", version, len(hdr) if hlen is None else hlen) + hdr + data

data = bytes(range(256)) * 32  # 8192 bytes
valid = snap(header(region=8192, checksum=format(fnv(data), "x")), data)
write("snapshot", "ok-verified", struct.pack("<QB", 0, 1) + valid)
write("snapshot", "ok-header-only-data-not-read", struct.pack("<QB", 8192, 0) + snap(header(region=8192)))
write("snapshot", "bad-checksum", struct.pack("<QB", 0, 1) + snap(header(region=8192, checksum="1"), data))
write("snapshot", "bad-truncated-data", struct.pack("<QB", 0, 0) + valid[:-4096])
write("snapshot", "bad-bytes-after-data", struct.pack("<QB", 0, 0) + valid + b"\0")
write("snapshot", "bad-region-near-intmax", struct.pack("<QB", (1 << 64) - 1, 0) + snap(header(region=9223372036854771712)))
write("snapshot", "bad-region-overflows-int", struct.pack("<QB", 0, 0) + snap(header(region=99999999999999999999)))
write("snapshot", "bad-header-length-u32-max", struct.pack("<QB", 0, 0) + snap(header(), hlen=0xFFFFFFFF))
write("snapshot", "bad-header-longer-than-file", struct.pack("<QB", 0, 0) + snap(header(), hlen=5000))
write("snapshot", "bad-magic", struct.pack("<QB", 0, 0) + snap(header(region=8192), data, magic=b"MEMLABSX"))
write("snapshot", "bad-version", struct.pack("<QB", 0, 0) + snap(header(region=8192), data, version=2))
write("snapshot", "bad-short-prefix", struct.pack("<QB", 0, 0) + b"MEMLABSN\x01")
write("snapshot", "bad-page-size-not-power-of-two", struct.pack("<QB", 0, 0) + snap(header(region=6000, page=3000), b"\0" * 6000))
write("snapshot", "bad-unknown-key", struct.pack("<QB", 0, 0) + snap(header(region=8192, extra="x=1\n"), data))
write("snapshot", "bad-line-without-equals", struct.pack("<QB", 0, 0) + snap(header(region=8192, extra="junk\n"), data))
write("snapshot", "bad-data-unreadable", struct.pack("<QB", 8192, 1) + snap(header(region=8192)))
# ---- qmp: lines as QEMU 7.2.22 sent them (captured 2026-12-02), and garbage ----
write("qmp", "ok-greeting", b'{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}')
write("qmp", "ok-session", b'{"return": {}}\n{"return": {"enabled": true, "present": true}}\n{"return": {"status": "prelaunch", "singlestep": false, "running": false}}\n{"timestamp": {"seconds": 1796227803, "microseconds": 584216}, "event": "RESUME"}\n{"timestamp": {"seconds": 1796227804, "microseconds": 192227}, "event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}}')
write("qmp", "ok-error", b'{"error": {"class": "CommandNotFound", "desc": "The command nonesuch has not been found"}}')
write("qmp", "bad-not-json", b'{"return": ')
write("qmp", "bad-array", b'[1, 2, 3]')
write("qmp", "bad-deep", b'[' * 5000)
write("qmp", "bad-huge-number", b'{"return": {"ram": {"transferred": 1e400}}}\n{"neither": 1}')

# ---- agent: the first byte picks the request (0 hello, 1 fill, 2 dirty-start, 3 dirty-stop,
# 4 chase, 5 free, 6 meminfo, 7 checksum); then the bytes a guest's agent sent ----
def aframe(t, payload=b"", flags=0, length=None):
    return b"ML" + bytes([t, flags]) + struct.pack("<I", len(payload) if length is None else length) + payload
hello = struct.pack("<IIIIQQ", 1, 4096, 1, 0, 209715200, 2648698526) + b"6.1.0-57-amd64"
write("agent", "ok-hello", b"\x00" + aframe(0x81, hello))
write("agent", "ok-fill", b"\x01" + aframe(0x82, struct.pack("<QQQ", 4096, 98000000, 0x1234567890abcdef)))
write("agent", "ok-dirty-start", b"\x02" + aframe(0x83))
write("agent", "ok-chase", b"\x04" + aframe(0x85, struct.pack("<QQQ", 34000000, 200000, 0x7f0000001000)))
write("agent", "ok-meminfo", b"\x06" + aframe(0x87, b"MemTotal:         209700 kB\nMemFree:          160000 kB\nHugePages_Total:       0\n"))
write("agent", "ok-two-replies", b"\x07" + aframe(0x88, struct.pack("<QQQ", 1, 4096, 5)) + aframe(0x88, struct.pack("<QQQ", 2, 4096, 6)))
write("agent", "bad-error", b"\x05" + aframe(0x7f, b"region 9 out of range (0..7)\x1b[2J"))
write("agent", "bad-hello-version", b"\x00" + aframe(0x81, struct.pack("<IIIIQQ", 2, 4096, 1, 0, 1, 1)))
write("agent", "bad-hello-page-size", b"\x00" + aframe(0x81, struct.pack("<IIIIQQ", 1, 4097, 1, 0, 1, 1)))
write("agent", "bad-short-reply", b"\x01" + aframe(0x82, b"\x01\x02"))
write("agent", "bad-wrong-type", b"\x03" + aframe(0x82, struct.pack("<QQQ", 1, 2, 3)))
write("agent", "bad-too-long", b"\x06" + aframe(0x87, b"", length=1 << 30))
write("agent", "bad-magic", b"\x06" + b"XX\x87\x00\x00\x00\x00\x00")
write("agent", "bad-flags", b"\x06" + aframe(0x87, b"", flags=1))
write("agent", "bad-meminfo-overflow", b"\x06" + aframe(0x87, b"MemTotal: 18446744073709551615 kB\n") + b"ML")

print("seeds written under", ROOT)

# ---- uffdhandler: role byte (even: session header, odd: stats header for 1024 pages), 16 × u64 ----
def words(ws):
    ws = list(ws) + [0] * (16 - len(ws))
    return struct.pack("<16Q", *ws)
SESSION, STATS = 0x4D4C5546_48444C31, 0x4D4C5546_53544131
region_at, bells_at = 0x7f0000000000, 0x7f0010000000
write("uffdhandler", "ok-session-64m-one-thread", b"\x00" + words([SESSION, region_at, 64 << 20, bells_at, 1, 4096, 0, 64, 1, 64 << 20]))
write("uffdhandler", "bad-session-doorbells-in-region", b"\x00" + words([SESSION, region_at, 64 << 20, region_at + 4096, 1, 4096, 0, 64, 1, 64 << 20]))
write("uffdhandler", "bad-session-region-wraps", b"\x00" + words([SESSION, (1 << 64) - 4096, 8192, bells_at, 1, 4096, 0, 64, 1, 8192]))
write("uffdhandler", "bad-session-17-threads", b"\x00" + words([SESSION, region_at, 64 << 20, bells_at, 17, 4096, 0, 64, 1, 64 << 20]))
write("uffdhandler", "bad-session-magic", b"\x00" + words([0, region_at, 64 << 20, bells_at, 1, 4096, 0, 64, 1, 64 << 20]))
write("uffdhandler", "ok-stats-100-latencies", b"\x01" + words([STATS, 1234, 100, 0, 0, 409600, 100, 0, 5000, 0, 0, 100]))
write("uffdhandler", "bad-stats-latencies-over-region", b"\x01" + words([STATS, 1234, 100, 0, 0, 409600, 100, 0, 5000, 0, 0, 1025]))
write("uffdhandler", "bad-stats-failure-call-9", b"\x01" + words([STATS, 1234, 100, 0, 0, 409600, 100, 0, 5000, 5, 9, 0]))

# ---- guestrun: mode byte (0 a run's result file for selftest:ok, 1 console bytes, 2 a --guest spec) ----
RESULT = b'{"checks":[],"distributions":[],"duration_s":0.256836182,"metrics":[{"better":"higher","name":"fill_throughput","samples":[10185485520.914976,10436350403.558155],"summary":{"ci95":[8717173362.80445,11904662561.66868],"max":10436350403.558155,"mean":10310917962.236565,"median":10310917962.236565,"min":10185485520.914976,"stddev":177388259.67855924},"unit":"bytes/s"},{"better":"lower","name":"fill_time","samples":[0.001647169,0.001607575],"summary":{"ci95":[0.001375831318,0.001878912682],"max":0.001647169,"mean":0.001627372,"median":0.001627372,"min":0.001607575,"stddev":2.7997185894300163e-05},"unit":"s"}],"notes":[],"param_units":{"deadline_s":"s","memory_limit":"bytes","oom_touch":"bytes","size":"bytes"},"params":{"deadline_s":30,"memory_limit":67108864,"oom_touch":268435456,"size":16777216},"placement":{"cpus":null,"node":null},"reason":null,"repetitions":2,"scenario":"selftest","settings":{"changed":{},"restored":true},"status":"ok","timeseries":[],"variant":"ok","warmup":0}'
write("guestrun", "ok-result", b"\x00" + RESULT)
write("guestrun", "bad-result-other-variant", b"\x00" + RESULT.replace(b'"variant":"ok"', b'"variant":"crash"'))
write("guestrun", "bad-result-negative-repetitions", b"\x00" + RESULT.replace(b'"repetitions":2', b'"repetitions":-2'))
write("guestrun", "bad-result-not-json", b"\x00" + b'{"scenario":"selftest",')
write("guestrun", "ok-console", b"\x01" + b"[    3.1] boot\r\nmemlab-guest: ready uptime 3.72\r\nmemlab-guest: running uptime 9.0\r\nmemlab-guest: progress 0 selftest:ok repetition 1/1\r\n")
write("guestrun", "ok-console-unusable", b"\x01" + b"memlab-guest: unusable: no 9p\n")
write("guestrun", "bad-console-noise", b"\x01" + b"\x1b[2Jmemlab-guest: progress -1 x\nmemlab-guest: progress 99999999999999999999 y\n" + b"x" * 9000 + b"\n")
write("guestrun", "ok-spec", b"\x02" + b"kernel=/boot/vmlinuz,mem=1G,cpus=2,numa=2,cgroup=v2,accel=tcg")
write("guestrun", "bad-spec-huge-mem", b"\x02" + b"kernel=/k,mem=99999999999999999T")
write("guestrun", "bad-spec-nodes", b"\x02" + b"kernel=/k,mem=128M,numa=8")
