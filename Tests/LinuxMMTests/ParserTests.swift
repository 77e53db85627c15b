import Testing
@testable import LinuxMM

// Pure parsing of procfs/sysfs text. Every fixture below is text captured from a real
// machine (kernel 6.18, x86_64), trimmed; where a captured value was 0 it is sometimes
// replaced by a plausible non-zero value so that a wrong unit or a wrong field would show.

// MARK: - /proc/meminfo

/// `cat /proc/meminfo`, trimmed; HugePages_* counts set non-zero (a 512-page 2M pool).
private let meminfoText = """
MemTotal:       24684092 kB
MemFree:        22123140 kB
MemAvailable:   23775376 kB
Buffers:           33984 kB
Cached:          1790820 kB
SwapCached:            0 kB
Active(anon):       1600 kB
Inactive(anon):   517700 kB
SwapTotal:       1048572 kB
SwapFree:        1048572 kB
AnonPages:        525396 kB
CommitLimit:    12342044 kB
Committed_AS:    1528856 kB
VmallocTotal:   34359738367 kB
AnonHugePages:         0 kB
FileHugePages:     32768 kB
HugePages_Total:     512
HugePages_Free:      500
HugePages_Rsvd:        3
HugePages_Surp:        0
Hugepagesize:       2048 kB
Hugetlb:         1048576 kB
DirectMap1G:    25165824 kB

"""

@Suite struct MemInfoTests {
    let info = MemInfo(text: meminfoText)

    @Test func kilobyteFieldsBecomeBytes() {
        #expect(info.memTotal == 24_684_092 * 1024)
        #expect(info.memAvailable == 23_775_376 * 1024)
        #expect(info.swapTotal == 1_048_572 * 1024)
        #expect(info.commitLimit == 12_342_044 * 1024)
        #expect(info.committedAS == 1_528_856 * 1024)
        #expect(info["MemFree"] == 22_123_140 * 1024)
        #expect(info["Hugepagesize"] == 2 * 1024 * 1024)
        #expect(info["Hugetlb"] == 1_048_576 * 1024)
        #expect(info["AnonHugePages"] == 0)
    }

    @Test func namesWithParenthesesAndLargeValues() {
        #expect(info["Active(anon)"] == 1600 * 1024)
        #expect(info["Inactive(anon)"] == 517_700 * 1024)
        #expect(info["VmallocTotal"] == 34_359_738_367 * 1024)
    }

    @Test func unitlessHugePagesFieldsAreCounts() {
        #expect(info["HugePages_Total"] == 512)
        #expect(info["HugePages_Free"] == 500)
        #expect(info["HugePages_Rsvd"] == 3)
        #expect(info["HugePages_Surp"] == 0)
    }

    @Test func everyLineIsParsedAndNothingElse() {
        #expect(info.fields.count == 23)
        #expect(info["NoSuchField"] == nil)
    }

    @Test func emptyTextGivesZeroes() {
        let empty = MemInfo(text: "")
        #expect(empty.fields.isEmpty)
        #expect(empty.memTotal == 0)
        #expect(empty.memAvailable == 0)
    }
}

// MARK: - /proc/vmstat

/// `cat /proc/vmstat`, excerpt.
private let vmstatText = """
nr_free_pages 824660
nr_zone_inactive_anon 129475
numa_hit 12309227
nr_anon_pages 131424
workingset_refault_file 1512303
pgfault 13180106
pgmajfault 4211
oom_kill 3
thp_fault_alloc 17
thp_fault_fallback 0
cow_ksm 101613

"""

@Suite struct VMStatTests {
    @Test func countersByName() {
        let v = VMStat(text: vmstatText)
        #expect(v.counters.count == 11)
        #expect(v["nr_free_pages"] == 824_660)
        #expect(v["pgfault"] == 13_180_106)
        #expect(v["pgmajfault"] == 4211)
        #expect(v["oom_kill"] == 3)
        #expect(v["thp_fault_alloc"] == 17)
        #expect(v["thp_fault_fallback"] == 0)
        #expect(v["cow_ksm"] == 101_613)
        #expect(v["ksm_swpin_copy"] == nil)
    }

    @Test func malformedLinesAreSkipped() {
        let v = VMStat(text: "good 1\nno_value\nnot_a_number x\nthree parts 2\n\nalso_good 42")
        #expect(v.counters == ["good": 1, "also_good": 42])
    }
}

// MARK: - /proc/buddyinfo

/// Captured on this machine (2026-12-03, Linux 6.18, one node) and in a two-node 6.1 guest.
let buddyinfoText = """
Node 0, zone      DMA      0      0      0      0      0      0      0      0      1      1      3 
Node 0, zone    DMA32      4      2      2      2      2      2      1      5      5      3    751 
Node 0, zone   Normal   5612   2494   2079   4506   4066   2407   1377    759    626    221    628 
Node 1, zone   Normal      7      1      0      0      0      0      0      0      0      2      0 
"""

@Suite struct BuddyInfoTests {
    @Test func zonesAndOrders() {
        let b = BuddyInfo(text: buddyinfoText)
        #expect(b.zones.count == 4)
        #expect(b.zones[2].node == 0 && b.zones[2].zone == "Normal" && b.zones[2].freeBlocks.count == 11)
        #expect(b.zones[2].freeBlocks.first == 5612 && b.zones[2].freeBlocks.last == 628)
        #expect(b.zones[3].node == 1)
    }

    /// 2M blocks: order 9 counts once, order 10 twice; the DMA zone only when asked.
    @Test func free2MBlocks() {
        let b = BuddyInfo(text: buddyinfoText)
        #expect(b.freeBlocks(atLeastOrder: 9, node: 0) == (3 + 751 * 2) + (221 + 628 * 2))
        #expect(b.freeBlocks(atLeastOrder: 9, node: 0, includingDMA: true) == (1 + 3 * 2) + (3 + 751 * 2) + (221 + 628 * 2))
        #expect(b.freeBlocks(atLeastOrder: 9, node: 1) == 2)
        #expect(b.freeBlocks(atLeastOrder: 9) == (3 + 751 * 2) + (221 + 628 * 2) + 2)
        #expect(b.freePages(node: 1) == 7 + 2 + 2 * 512)
    }

    @Test func malformedLinesAreSkippedAndSumsSaturate() {
        let b = BuddyInfo(text: "Node x, zone DMA 1 2\nNode 0 zone Normal 1 2\nNode 0, zone Normal 1 two\nNode 0, zone Normal 18446744073709551615 0 0 0 0 0 0 0 0 0 18446744073709551615\n")
        #expect(b.zones.count == 1)
        #expect(b.freePages() == .max && b.freeBlocks(atLeastOrder: 9) == .max)
    }
}

// MARK: - /proc/PID/smaps_rollup

/// `cat /proc/self/smaps_rollup`; Rss/Anonymous/AnonHugePages raised to a process that
/// got one 2M THP.
private let smapsRollupText = """
55f7c123b000-7ffc3d533000 ---p 00000000 00:00 0                          [rollup]
Rss:                3808 kB
Pss:                 259 kB
Pss_Dirty:           112 kB
Pss_Anon:            112 kB
Pss_File:            147 kB
Pss_Shmem:             0 kB
Shared_Clean:       1600 kB
Shared_Dirty:          0 kB
Private_Clean:        48 kB
Private_Dirty:      2160 kB
Referenced:         3808 kB
Anonymous:          2160 kB
KSM:                   0 kB
LazyFree:              0 kB
AnonHugePages:      2048 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Swap:                  0 kB
SwapPss:               0 kB
Locked:                0 kB

"""

@Suite struct SmapsRollupTests {
    let rollup = SmapsRollup(text: smapsRollupText)

    @Test func fieldsAreBytes() {
        #expect(rollup.rss == 3808 * 1024)
        #expect(rollup.anonHugePages == 2048 * 1024)
        #expect(rollup["Pss"] == 259 * 1024)
        #expect(rollup["Private_Dirty"] == 2160 * 1024)
        #expect(rollup["Anonymous"] == 2160 * 1024)
        #expect(rollup["KSM"] == 0)
    }

    @Test func headerLineIsIgnored() {
        // The header holds a colon ("00:00") but is not a "Name: N kB" line.
        #expect(rollup.fields.count == 22)
        #expect(rollup.fields.keys.allSatisfy { !$0.contains(" ") && !$0.contains("-") })
    }

    @Test func emptyTextGivesZeroes() {
        let empty = SmapsRollup(text: "")
        #expect(empty.rss == 0)
        #expect(empty.anonHugePages == 0)
    }
}

// MARK: - /proc/PID/ksm_stat

@Suite struct KSMStatTests {
    /// 6.1 writes only ksm_rmap_items into ksm_stat (fs/proc/base.c, proc_pid_ksm_stat). The fields
    /// it lacks are known to be missing, never a 0 the kernel said.
    @Test func captured61() {
        let s = KSMStat(text: "ksm_rmap_items 4096\n")
        #expect(s.rmapItems == 4096 && !s.hasMergingPages && !s.hasProcessProfit)
    }

    @Test func capturedIdleProcess() {
        // `cat /proc/self/ksm_stat` of a process that never opted in.
        let s = KSMStat(text: """
        ksm_rmap_items 0
        ksm_zero_pages 0
        ksm_merging_pages 0
        ksm_process_profit 0
        ksm_merge_any: no
        ksm_mergeable: no

        """)
        var zero = KSMStat()
        zero.hasMergingPages = true
        zero.hasProcessProfit = true
        #expect(s == zero)
        #expect(!s.mergeAny)
        #expect(!s.mergeable)
    }

    @Test func mergingProcessWithFlagsAndValues() {
        let s = KSMStat(text: """
        ksm_rmap_items 4608
        ksm_zero_pages 128
        ksm_merging_pages 4096
        ksm_process_profit 16482304
        ksm_merge_any: yes
        ksm_mergeable: yes

        """)
        #expect(s.rmapItems == 4608)
        #expect(s.zeroPages == 128)
        #expect(s.mergingPages == 4096)
        #expect(s.processProfit == 16_482_304)
        #expect(s.mergeAny)
        #expect(s.mergeable)
    }

    @Test func negativeProfitAndMixedFlags() {
        // rmap items cost 64 bytes each; nothing merged yet, so the profit is negative.
        let s = KSMStat(text: """
        ksm_rmap_items 19008
        ksm_zero_pages 0
        ksm_merging_pages 0
        ksm_process_profit -1216512
        ksm_merge_any: no
        ksm_mergeable: yes

        """)
        #expect(s.rmapItems == 19008)
        #expect(s.processProfit == -1_216_512)
        #expect(!s.mergeAny)
        #expect(s.mergeable)
    }

    @Test func olderKernelWithFewerFields() {
        // 6.1 had only rmap items; absent fields keep their defaults.
        let s = KSMStat(text: "ksm_rmap_items 12\n")
        #expect(s.rmapItems == 12)
        #expect(s.mergingPages == 0)
        #expect(s.processProfit == 0)
        #expect(!s.mergeable)
    }
}

// MARK: - /proc/PID/stat

@Suite struct ProcStatTests {
    @Test func capturedInitStat() throws {
        // `cat /proc/1/stat`
        let text = "1 (process_api) S 0 0 0 0 -1 4194560 39373 1249391 0 176 109 1019 1531 868 20 0 13 0 24 45174784 3458 18446744073709551615 1 1 0 0 0 0 0 4096 1256 0 0 0 17 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
        let s = try #require(ProcStat(text: text))
        #expect(s.pid == 1)
        #expect(s.comm == "process_api")
        #expect(s.state == "S")
        #expect(s.utimeTicks == 109)    // field 14
        #expect(s.stimeTicks == 1019)   // field 15
        #expect(s.startTimeTicks == 24) // field 22
    }

    @Test func commWithSpacesAndParentheses() throws {
        // comm "(a b) c)": fields must be counted from the last ')'. Every field has a
        // distinct value so that an off-by-one would pick a different number.
        let text = "4242 ((a b) c)) R 1 4240 4239 34816 4242 4194304 120 7 8 9 37 11 13 17 20 0 1 0 98765 12345678 321 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 3 0 0 0 0 0\n"
        let s = try #require(ProcStat(text: text))
        #expect(s.pid == 4242)
        #expect(s.comm == "(a b) c)")
        #expect(s.state == "R")
        #expect(s.utimeTicks == 37)
        #expect(s.stimeTicks == 11)
        #expect(s.startTimeTicks == 98765)
    }

    @Test func cpuSecondsAddsUserAndSystemTicks() throws {
        let text = "77 (ksmd) S 2 0 0 0 -1 2097216 0 0 0 0 250 150 0 0 25 5 1 0 40 0 0 18446744073709551615 0 0 0 0 0 0 0 2147483647 0 0 0 0 3 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
        let s = try #require(ProcStat(text: text))
        #expect(s.comm == "ksmd")
        #expect(s.cpuSeconds == 400.0 / Double(Clock.ticksPerSecond))
    }

    @Test func malformedTextIsRejected() {
        #expect(ProcStat(text: "") == nil)
        #expect(ProcStat(text: "1 process_api S 0 0") == nil)          // no parentheses
        #expect(ProcStat(text: "1 (process_api) S 0 0 0 0 -1 4194560") == nil) // truncated
        #expect(ProcStat(text: "x (a) S 0 0 0 0 -1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1") == nil) // bad pid
    }
}

// MARK: - Knob effective value

@Suite struct KnobTests {
    @Test func selectorFileGivesBracketedChoice() {
        #expect(Knob.effectiveValue(of: "always [madvise] never\n") == "madvise")
        #expect(Knob.effectiveValue(of: "[always] madvise never\n") == "always")
        #expect(Knob.effectiveValue(of: "always madvise [never]\n") == "never")
        // THP defrag: a choice containing '+' and several options.
        #expect(Knob.effectiveValue(of: "always defer [defer+madvise] madvise never\n") == "defer+madvise")
    }

    @Test func plainValueIsTrimmed() {
        #expect(Knob.effectiveValue(of: "100\n") == "100")
        #expect(Knob.effectiveValue(of: "  0\n") == "0")
        #expect(Knob.effectiveValue(of: "zstd\n") == "zstd")
        #expect(Knob.effectiveValue(of: "") == "")
    }
}

// MARK: - CounterFile.parse

private func parse(_ text: String, key: String = "") -> Int64? {
    Array(text.utf8).withUnsafeBytes { CounterFile.parse($0, key: Array(key.utf8)) }
}

@Suite struct CounterFileParseTests {
    /// memory.oom_control of a v1 memory cgroup.
    let oomControl = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"
    /// memory.events of a v2 memory cgroup.
    let memoryEvents = "low 0\nhigh 0\nmax 12\noom 1\noom_kill 5\noom_group_kill 0\n"

    @Test func keyAtLineStart() {
        #expect(parse(oomControl, key: "oom_kill") == 3)
        #expect(parse(oomControl, key: "under_oom") == 0)
        #expect(parse(oomControl, key: "oom_kill_disable") == 0)
        #expect(parse(memoryEvents, key: "max") == 12)
        #expect(parse(memoryEvents, key: "oom") == 1)
        #expect(parse(memoryEvents, key: "oom_kill") == 5)
        #expect(parse(vmstatText, key: "pgfault") == 13_180_106)
        #expect(parse(vmstatText, key: "pgmajfault") == 4211)
    }

    @Test func keyThatIsOnlyAPrefixOfAnotherDoesNotMatch() {
        // "oom_kill_disable 0" comes first but is a different key.
        #expect(parse("oom_kill_disable 9\noom_kill 3\n", key: "oom_kill") == 3)
        #expect(parse("oom_group_kill 9\noom_kill 4\noom 2\n", key: "oom") == 2)
        #expect(parse("oom_kill_disable 0\n", key: "oom_kill") == nil)
        // A line that merely ends with the key is not a match either.
        #expect(parse("total_oom_kill 8\noom_kill 1\n", key: "oom_kill") == 1)
        #expect(parse("numa_hit 12309227\n", key: "hit") == nil)
    }

    @Test func separatorsSpaceTabColon() {
        #expect(parse("total_rss\t4096\n", key: "total_rss") == 4096)
        #expect(parse("VmRSS:\t    1760 kB\n", key: "VmRSS") == 1760)
        #expect(parse("ksm_rmap_items 2560\n", key: "ksm_rmap_items") == 2560)
    }

    @Test func lastLineWithoutNewline() {
        #expect(parse("a 1\nb 2", key: "b") == 2)
    }

    @Test func negativeNumbers() {
        #expect(parse("ksm_rmap_items 19008\nksm_process_profit -1216512\n", key: "ksm_process_profit") == -1_216_512)
        #expect(parse("-8192\n") == -8192)  // /sys/kernel/mm/ksm/general_profit
    }

    @Test func singleNumberFileWithEmptyKey() {
        #expect(parse("42\n") == 42)
        #expect(parse("  7\n") == 7)
        #expect(parse("0") == 0)
        // memory.limit_in_bytes of an unlimited v1 cgroup.
        #expect(parse("9223372036854771712\n") == 9_223_372_036_854_771_712)
    }

    @Test func missingKeyOrNoNumberGivesNil() {
        #expect(parse(oomControl, key: "oom_group_kill") == nil)
        #expect(parse("", key: "oom_kill") == nil)
        #expect(parse("") == nil)
        #expect(parse("max\n") == nil)                            // memory.max unlimited
        #expect(parse("ksm_merge_any: no\n", key: "ksm_merge_any") == nil)
        #expect(parse("oom_kill\n", key: "oom_kill") == nil)
        #expect(parse("oom_kill", key: "oom_kill") == nil)        // key, then end of buffer
        #expect(parse("-\n") == nil)
    }
}

// MARK: - /proc/swaps

@Suite struct SwapTests {
    @Test func oneSwapFile() throws {
        let text = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n/swapfile                               file\t\t1048572\t\t0\t\t-2\n"
        let areas = Swap.areas(text: text)
        try #require(areas.count == 1)
        #expect(areas[0].path == "/swapfile")
        #expect(areas[0].type == "file")
        #expect(areas[0].sizeBytes == 1_048_572 * 1024)
        #expect(areas[0].usedBytes == 0)
    }

    @Test func partitionAndFileWithUsage() throws {
        let text = """
        Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority
        /dev/vda2                               partition\t2097148\t\t5120\t\t-2
        /swapfile                               file\t\t1048572\t\t256\t\t-3

        """
        let areas = Swap.areas(text: text)
        try #require(areas.count == 2)
        #expect(areas[0] == Swap.Area(path: "/dev/vda2", type: "partition", sizeBytes: 2_097_148 * 1024, usedBytes: 5120 * 1024))
        #expect(areas[1] == Swap.Area(path: "/swapfile", type: "file", sizeBytes: 1_048_572 * 1024, usedBytes: 256 * 1024))
    }

    @Test func headerOnlyOrNoFileMeansNoSwap() {
        // Captured from a machine without swap: just the header.
        #expect(Swap.areas(text: "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n").isEmpty)
        #expect(Swap.areas(text: nil).isEmpty)
    }
}

// MARK: - memory cgroup mount detection

@Suite struct MemoryCgroupMountTests {
    @Test func v1MemoryHierarchyFromCapturedMounts() {
        // `cat /proc/self/mounts`, excerpt; the cgroup2 mount point is moved somewhere that
        // does not exist so that detection does not depend on this machine's cgroupfs.
        let mounts = """
        proc /proc proc rw,relatime 0 0
        sysfs /sys sysfs rw,relatime 0 0
        /dev/vda / ext4 rw,relatime,discard 0 0
        tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
        cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
        cgroup /sys/fs/cgroup/cpuset cgroup rw,relatime,cpuset 0 0
        cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
        cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
        cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
        cgroup2 /nonexistent/memlab-test/unified cgroup2 rw,relatime 0 0

        """
        let found = MemoryCgroupMount.detect(mounts: mounts)
        #expect(found == [.v1(root: "/sys/fs/cgroup/memory")])
        #expect(found.first?.root == "/sys/fs/cgroup/memory")
    }

    @Test func memoryMustBeAWholeOption() {
        let mounts = """
        cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,nodev,noexec,relatime,cpu,cpuacct 0 0
        cgroup /sys/fs/cgroup/odd cgroup rw,relatime,memory_recursiveprot 0 0
        cgroup /sys/fs/cgroup/mem cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0

        """
        #expect(MemoryCgroupMount.detect(mounts: mounts) == [.v1(root: "/sys/fs/cgroup/mem")])
    }

    @Test func noMemoryController() {
        #expect(MemoryCgroupMount.detect(mounts: "proc /proc proc rw,relatime 0 0\n").isEmpty)
        #expect(MemoryCgroupMount.detect(mounts: nil).isEmpty)
        #expect(MemoryCgroupMount.v2(root: "/sys/fs/cgroup").root == "/sys/fs/cgroup")
    }
}
