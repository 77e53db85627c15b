#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing
@testable import LabKit
import LinuxMM

/// How a memlab memory cgroup is set up, against a fake cgroupfs in a temporary directory
/// (the files the kernel would offer, as plain files): swap capped with the limit on v1 and
/// v2, +memory delegated on v2 only when needed, and given back by the guard's restore.
@Suite final class CgroupSetupTests {
    let root: String
    init() throws {
        root = NSTemporaryDirectory() + "memlab-cgtest-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: root + "/memlab-1", withIntermediateDirectories: true)
    }
    deinit { try? FileManager.default.removeItem(atPath: root) }
    func put(_ rel: String, _ text: String = "") { FileManager.default.createFile(atPath: "\(root)/\(rel)", contents: Data(text.utf8)) }
    func get(_ rel: String) -> String { (try? String(contentsOfFile: "\(root)/\(rel)", encoding: .utf8)) ?? "(missing)" }

    @Test func v1CapsSwapThroughMemswWherePresent() throws {
        for f in ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "memory.swappiness"] { put("memlab-1/\(f)", "x") }
        try MemoryCgroup(path: root + "/memlab-1", version: 1).setLimit(bytes: 67108864)
        #expect(get("memlab-1/memory.limit_in_bytes") == "67108864")
        #expect(get("memlab-1/memory.memsw.limit_in_bytes") == String(67108864 + Int(getpagesize())), "one page of slack: the memory limit is met first")
        #expect(get("memlab-1/memory.swappiness") == "x", "memsw caps swap; swappiness is left alone")
    }

    @Test func v1WithoutSwapAccountingSetsSwappinessZero() throws {
        for f in ["memory.limit_in_bytes", "memory.swappiness"] { put("memlab-1/\(f)", "x") }
        try MemoryCgroup(path: root + "/memlab-1", version: 1).setLimit(bytes: 4096)
        #expect(get("memlab-1/memory.swappiness") == "0")
    }

    @Test func swapLeftAloneWhenTheScenarioPagesOut() throws {
        for f in ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "memory.swappiness"] { put("memlab-1/\(f)", "x") }
        try MemoryCgroup(path: root + "/memlab-1", version: 1).setLimit(bytes: 4096, capSwap: false)
        #expect(get("memlab-1/memory.memsw.limit_in_bytes") == "x")
        #expect(get("memlab-1/memory.swappiness") == "x")
        for f in ["memory.max", "memory.swap.max"] { put("memlab-1/\(f)", "max") }
        try MemoryCgroup(path: root + "/memlab-1", version: 2).setLimit(bytes: 4096, capSwap: false)
        #expect(get("memlab-1/memory.max") == "4096")
        #expect(get("memlab-1/memory.swap.max") == "max")
        #expect(TmemScenarioAllowsSwap.check)
    }

    @Test func v2DelegatesMemoryOnlyWhenNeededAndOffered() throws {
        let cg = MemoryCgroup(path: root + "/memlab-1", version: 2)
        put("cgroup.controllers", "cpuset cpu io pids\n")
        #expect(throws: SystemError.self) { try cg.parentSubtreeControlNeedingMemory() }
        put("cgroup.controllers", "cpuset cpu io memory pids\n")
        put("cgroup.subtree_control", "cpu memory\n")
        #expect(try cg.parentSubtreeControlNeedingMemory() == nil)
        put("cgroup.subtree_control", "cpu\n")
        #expect(try cg.parentSubtreeControlNeedingMemory() == root + "/cgroup.subtree_control")
        #expect(try MemoryCgroup(path: root + "/memlab-1", version: 1).parentSubtreeControlNeedingMemory() == nil)
    }

    @Test func guardEnablesTheControllerAndGivesItBack() throws {
        put("cgroup.subtree_control", "cpu\n")
        let state = root + "/state"
        try FileManager.default.createDirectory(atPath: state, withIntermediateDirectories: true)
        let g = SettingsGuard(stateDirectory: state, command: "test")
        try g.enableController("memory", subtreeControl: root + "/cgroup.subtree_control")
        #expect(get("cgroup.subtree_control") == "+memory")
        let journal = try String(contentsOfFile: g.journalPath, encoding: .utf8)
        #expect(journal.contains("enabled_controllers"), "journaled before the write: \(journal)")
        let report = g.restoreAll()
        #expect(report.restored, "\(report.failures)")
        #expect(get("cgroup.subtree_control") == "-memory")
        #expect(!FileManager.default.fileExists(atPath: g.journalPath))
    }
}

/// The scenarios that page out on purpose say so; the default (OOM outcomes) caps swap.
enum TmemScenarioAllowsSwap {
    struct Plain: Scenario {
        let id = "plain", summary = "", variants: [Variant] = [], parameters: [ParameterSpec] = []
        func run(_ context: RunContext) throws {}
    }
    static var check: Bool { !Plain().memoryLimitAllowsSwap(variant: "x", params: Params()) }
}
