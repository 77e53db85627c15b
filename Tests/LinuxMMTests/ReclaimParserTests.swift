import Testing
@testable import LinuxMM

// Parsers behind the `reclaim` scenario, on text captured from real kernels: cgroup v1
// memory.stat from this host (6.18, cgroup v1 memory), cgroup v2 memory.stat from Debian 6.1
// and 6.12 guests (QEMU, cgroup v2), the DAMON admin files and /proc/kallsyms of this host.

/// `cat /sys/fs/cgroup/memory/memory.stat` (v1 root), first lines, kernel 6.18.
private let memoryStatV1 = """
cache 9908224
rss 3489792
rss_huge 0
shmem 9580544
mapped_file 7385088
dirty 24576
writeback 0
workingset_refault_anon 8
swap 0
pgpgin 50154
pgpgout 46881
pgfault 85887
hierarchical_memory_limit 9223372036854771712
total_rss 8421376
total_pgmajfault 1295844

"""

/// memory.stat of a cgroup v2 child holding a shell, Debian 6.1.0-57 guest.
private let memoryStatV2 = """
anon 3182592
file 81920
kernel 114688
kernel_stack 16384
pagetables 40960
sec_pagetables 0
percpu 0
sock 0
vmalloc 0
shmem 0
zswap 0
zswapped 0
file_mapped 65536
file_dirty 0
file_writeback 0
swapcached 0
anon_thp 0
file_thp 0
shmem_thp 0
inactive_anon 3166208
active_anon 4096
inactive_file 32768
active_file 24576
unevictable 0
slab_reclaimable 9280
slab_unreclaimable 22912
slab 32192
workingset_refault_anon 0
workingset_refault_file 0
workingset_activate_anon 0
workingset_activate_file 0
workingset_restore_anon 0
workingset_restore_file 0
workingset_nodereclaim 0
pgscan 0
pgsteal 0
pgscan_kswapd 0
pgscan_direct 0
pgsteal_kswapd 0
pgsteal_direct 0
pgfault 1866
pgmajfault 68
pgrefill 0
pgactivate 6
pgdeactivate 0
pglazyfree 0
pglazyfreed 0
zswpin 0
zswpout 0
thp_fault_alloc 0
thp_collapse_alloc 0

"""

/// The same capture in a Debian 6.12.95 guest: zswpwb, swpout_zero and pgdemote_* are there.
private let memoryStatV2_612 = """
anon 3182592
file 81920
kernel 118784
kernel_stack 16384
pagetables 49152
sec_pagetables 0
percpu 0
sock 0
vmalloc 0
shmem 0
zswap 0
zswapped 0
file_mapped 65536
file_dirty 0
file_writeback 0
swapcached 0
anon_thp 0
file_thp 0
shmem_thp 0
inactive_anon 0
active_anon 3170304
inactive_file 4096
active_file 57344
unevictable 0
slab_reclaimable 4232
slab_unreclaimable 31688
slab 35920
workingset_refault_anon 0
workingset_refault_file 0
workingset_activate_anon 0
workingset_activate_file 0
workingset_restore_anon 0
workingset_restore_file 0
workingset_nodereclaim 0
pgdemote_kswapd 0
pgdemote_direct 0
pgdemote_khugepaged 0
pgpromote_success 0
pgscan 0
pgsteal 0
pgscan_kswapd 0
pgscan_direct 0
pgscan_khugepaged 0
pgsteal_kswapd 0
pgsteal_direct 0
pgsteal_khugepaged 0
pgfault 1791
pgmajfault 59
pgrefill 0
pgactivate 0
pgdeactivate 0
pglazyfree 0
pglazyfreed 0
swpin_zero 0
swpout_zero 0
zswpin 0
zswpout 0
zswpwb 0
thp_fault_alloc 0
thp_collapse_alloc 0
thp_swpout 0
thp_swpout_fallback 0
numa_pages_migrated 0
numa_pte_updates 0
numa_hint_faults 0

"""

@Suite struct MemoryStatTests {
    @Test func v1KeysAndHugeValues() {
        let s = MemoryStat(text: memoryStatV1)
        #expect(s["cache"] == 9_908_224)
        #expect(s["rss"] == 3_489_792)
        #expect(s["hierarchical_memory_limit"] == 9_223_372_036_854_771_712)
        #expect(s["total_pgmajfault"] == 1_295_844)
        #expect(s["pgsteal"] == nil, "v1 has no pgsteal: absent, not 0")
    }

    @Test func v2ReclaimAndZswapCounters() {
        let s = MemoryStat(text: memoryStatV2)
        for key in ["anon", "file", "zswap", "zswapped", "pgscan", "pgsteal", "zswpout", "zswpin", "pgfault", "thp_collapse_alloc"] {
            #expect(s[key] != nil, "\(key) is in v2 memory.stat")
        }
        #expect(s["anon"] == 3_182_592)
        #expect(s["pgfault"] == 1866)
        #expect(s["zswpwb"] == nil, "6.1 has no zswpwb (6.8+): absent, not 0")
    }

    @Test func v2On612HasWriteback() {
        let s = MemoryStat(text: memoryStatV2_612)
        #expect(s["zswpwb"] == 0 && s["swpout_zero"] == 0 && s["pgdemote_kswapd"] == 0)
        #expect(s["active_anon"] == 3_170_304)
        #expect(s["slab"] == 35_920)
        #expect(s.counters.count == memoryStatV2_612.split(separator: "\n").count)
    }

    @Test func deltasAreSignedAndNeedBothSides() {
        let a = MemoryStat(text: "pgsteal 100\nanon 4096\n")
        let b = MemoryStat(text: "pgsteal 4196\nanon 0\nzswpwb 3\n")
        #expect(b.delta("pgsteal", since: a) == 4096)
        #expect(b.delta("anon", since: a) == -4096, "a gauge may fall")
        #expect(b.delta("zswpwb", since: a) == nil, "a counter the older kernel lacked is not taken as 0")
    }

    @Test func hostileLinesAreSkipped() {
        let s = MemoryStat(text: "anon 1\n 2\nfile x\nthree parts 3\npgscan 18446744073709551616\nzswap -1\n\u{0}\nshmem  7\n")
        #expect(s.counters == ["anon": 1, "shmem": 7])
    }
}

/// The scheme stats files of this host's kdamond 0 (`for f in stats/*; do echo "$f=$(cat $f)"`),
/// values made non-zero so a swapped field would show.
private let schemeStatsFiles = ["nr_tried": "12\n", "sz_tried": "50331648\n", "nr_applied": "9\n",
                                "sz_applied": "37748736\n", "qt_exceeds": "0\n", "sz_ops_filter_passed": "0\n"]

/// /proc/kallsyms lines of this host (CONFIG_DAMON_PADDR=y, CONFIG_DAMON_VADDR unset).
private let kallsymsPaddrOnly = """
ffffffff81000000 T _stext
ffffffff816c41f0 t damon_pa_scheme_score
ffffffff816c4740 t damon_pa_apply_scheme
ffffffff816c9630 t damon_sysfs_kdamond_release
ffffffff837c6770 t damon_pa_initcall
"""

@Suite struct DamonParserTests {
    @Test func schemeStatsFromTheirFiles() throws {
        let s = try #require(Damon.SchemeStats(files: schemeStatsFiles))
        #expect(s.nrTried == 12 && s.szTried == 50_331_648 && s.nrApplied == 9 && s.szApplied == 37_748_736 && s.qtExceeds == 0)
    }

    @Test func aMissingOrGarbledCounterIsNotZero() {
        var files = schemeStatsFiles
        files["sz_applied"] = nil
        #expect(Damon.SchemeStats(files: files) == nil)
        files["sz_applied"] = "-5\n"
        #expect(Damon.SchemeStats(files: files) == nil)
        files["sz_applied"] = "1\n"
        files["qt_exceeds"] = nil
        #expect(Damon.SchemeStats(files: files)?.qtExceeds == 0, "qt_exceeds came later: optional")
    }

    @Test func operationsFromKallsyms() {
        #expect(Damon.operations(kallsyms: kallsymsPaddrOnly) == ["paddr"])
        #expect(Damon.operations(kallsyms: kallsymsPaddrOnly + "\nffffffff816c0000 t damon_va_apply_scheme\n") == ["vaddr", "fvaddr", "paddr"])
        #expect(Damon.operations(kallsyms: "") == [])
        #expect(Damon.operations(kallsyms: "garbage\n\n x y\n") == [])
    }

    /// This host: paddr only, and the VM's own kdamond 0 running (pid 72): both reasons given.
    @Test func reasonsWhyDamonCannotBeUsed() throws {
        guard Damon.isAvailable else { return }
        let foreign = [Damon.KdamondState(index: 0, state: "on", pid: 72, operations: ["paddr"])]
        let both = try #require(Damon.unavailableReason(ops: ["paddr"], configured: foreign))
        #expect(both.contains("CONFIG_DAMON_VADDR") && both.contains("kdamond 0 on (pid 72), paddr") && both.contains("not memlab's"))
        let busy = try #require(Damon.unavailableReason(ops: ["vaddr", "fvaddr", "paddr"], configured: foreign))
        #expect(!busy.contains("CONFIG_DAMON_VADDR") && busy.contains("EBUSY"))
        #expect(Damon.unavailableReason(ops: ["vaddr", "paddr"], configured: []) == nil)
    }

    /// The order the admin interface needs: each nr_* before the directories it makes.
    @Test func schemeWritesMakeDirectoriesFirst() {
        let scheme = Damon.PageoutScheme(pid: 4242, sampleUS: 5000, aggrUS: 100_000, updateUS: 1_000_000, maxAccesses: 0, minAge: 20)
        let files = scheme.writes.map(\.0)
        func index(_ f: String) -> Int { files.firstIndex(of: f) ?? -1 }
        #expect(index("contexts/nr_contexts") == 0)
        #expect(index("contexts/0/targets/nr_targets") < index("contexts/0/targets/0/pid_target"))
        #expect(index("contexts/0/schemes/nr_schemes") < index("contexts/0/schemes/0/action"))
        let values = Dictionary(scheme.writes, uniquingKeysWith: { a, _ in a })
        #expect(values["contexts/0/operations"] == "vaddr")
        #expect(values["contexts/0/targets/0/pid_target"] == "4242")
        #expect(values["contexts/0/schemes/0/action"] == "pageout")
        #expect(values["contexts/0/schemes/0/access_pattern/nr_accesses/max"] == "0")
        #expect(values["contexts/0/schemes/0/access_pattern/age/min"] == "20")
    }
}
