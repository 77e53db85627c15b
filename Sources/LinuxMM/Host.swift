#if canImport(Glibc)
import Glibc
#endif

/// Facts about the machine a result was measured on: enough to tell two hosts apart and to
/// explain a difference between their numbers.
public struct HostFacts: Sendable, Codable, Equatable {
    public var kernel: String
    public var arch: String
    public var cpus: Int
    public var memoryBytes: UInt64
    public var numaNodes: Int
    public var pageSize: Int
    public var virtualized: Bool
    public var cpuModel: String

    public static func current() -> HostFacts {
        var u = utsname()
        uname(&u)
        func field<T>(_ value: T) -> String {
            withUnsafePointer(to: value) { $0.withMemoryRebound(to: CChar.self, capacity: 65) { String(cString: $0) } }
        }
        let cpuinfo = ProcFile.readIfPresent("/proc/cpuinfo") ?? ""
        let flags = cpuinfo.split(separator: "\n").first { $0.hasPrefix("flags") } ?? ""
        let model = cpuinfo.split(separator: "\n").first { $0.hasPrefix("model name") }
            .flatMap { $0.split(separator: ":", maxSplits: 1).last }.map { $0.trimmingWhitespace() } ?? ""
        let nodes = ProcFile.list("/sys/devices/system/node").filter { $0.hasPrefix("node") && Int($0.dropFirst(4)) != nil }.count
        return HostFacts(
            kernel: field(u.release), arch: field(u.machine), cpus: System.onlineCPUs,
            memoryBytes: (try? MemInfo.current().memTotal) ?? 0,
            numaNodes: max(nodes, 1), pageSize: System.pageSize,
            virtualized: flags.split(separator: " ").contains("hypervisor")
                || ProcFile.exists("/sys/hypervisor/type"),
            cpuModel: model)
    }
}
