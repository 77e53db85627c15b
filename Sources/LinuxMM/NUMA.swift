#if canImport(Glibc)
import Glibc
#endif
import CNUMA
import CLinuxMM

/// Placement: which CPUs a process runs on and which NUMA node its memory comes from, through
/// libnuma and sched_setaffinity.
public enum NUMA {
    /// libnuma's own check: false on kernels without NUMA support.
    public static var isAvailable: Bool { numa_available() >= 0 }

    public static var nodeCount: Int { isAvailable ? Int(numa_max_node()) + 1 : 1 }

    /// Size and free memory of a node, as libnuma reports them (node 0 is usually smaller than
    /// MemTotal; do not treat it as the machine's size).
    public static func nodeSize(_ node: Int) -> (total: Int64, free: Int64)? {
        guard isAvailable else { return nil }
        var free: Int64 = 0
        let total = numa_node_size64(Int32(node), &free)
        return total < 0 ? nil : (Int64(total), free)
    }

    /// Runs the calling process on the CPUs of `node` and binds its future allocations there.
    public static func bind(toNode node: Int) throws(SystemError) {
        guard isAvailable else { throw SystemError(errno: ENOSYS, call: "numa_available") }
        guard node >= 0 && node < nodeCount else { throw SystemError(errno: EINVAL, call: "numa node \(node)") }
        if numa_run_on_node(Int32(node)) != 0 { throw SystemError.current("numa_run_on_node(\(node))") }
        guard let mask = numa_allocate_nodemask() else { throw SystemError(errno: ENOMEM, call: "numa_allocate_nodemask") }
        defer { numa_bitmask_free(mask) }
        numa_bitmask_setbit(mask, UInt32(node))
        numa_set_membind(mask)
    }

    /// Pins the calling thread's process to the given CPUs.
    public static func setAffinity(cpus: [Int]) throws(SystemError) {
        let list = cpus.map { Int32($0) }
        let rc = list.withUnsafeBufferPointer { memlab_set_affinity($0.baseAddress, Int32($0.count)) }
        if rc != 0 { throw SystemError.current("sched_setaffinity(\(cpus))") }
    }

    /// Pins another thread (by its tid) to the given CPUs.
    public static func setAffinity(thread tid: Int32, cpus: [Int]) throws(SystemError) {
        let list = cpus.map { Int32(clamping: $0) }
        let rc = list.withUnsafeBufferPointer { memlab_set_thread_affinity(tid, $0.baseAddress, Int32($0.count)) }
        if rc != 0 { throw SystemError.current("sched_setaffinity(thread \(tid), \(cpus))") }
    }

    /// The node of the first CPU the calling thread may run on (0 without NUMA).
    public static var currentNode: Int {
        guard isAvailable, let cpu = currentAffinity().first else { return 0 }
        return max(0, Int(numa_node_of_cpu(Int32(cpu))))
    }

    public static func currentAffinity() -> [Int] {
        var buf = [Int32](repeating: 0, count: 1024)
        let n = buf.withUnsafeMutableBufferPointer { memlab_get_affinity($0.baseAddress, 1024) }
        return n < 0 ? [] : buf[0..<Int(n)].map { Int($0) }
    }
}
