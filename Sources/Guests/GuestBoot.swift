#if canImport(Glibc)
import Glibc
#endif
import Foundation
import LabKit
import LinuxMM

/// How a guest's vCPUs run: KVM only when a guest really boots under it (here `/dev/kvm` is
/// kvm_pvm, which a stock guest kernel cannot use: QEMU aborts setting an MSR), else TCG.
/// Every result records which; a timing that depends on it says so.
public enum Accelerator: String, Sendable, CaseIterable {
    case kvm, tcg
    var qemuArguments: [String] {
        switch self {
        case .kvm: return ["-machine", "q35,accel=kvm", "-cpu", "host"]
        case .tcg: return ["-machine", "q35,accel=tcg", "-cpu", "max"]
        }
    }
}

/// Where a guest's RAM comes from on the host (QEMU's memory backends).
public enum GuestBacking: Sendable, Equatable {
    /// Anonymous memory (QEMU's default RAM; it asks for THP with MADV_HUGEPAGE, so the host's
    /// THP setting decides 4K or 2M).
    case anonymous
    /// A memfd, optionally on hugetlbfs pages of `hugetlbKiB` (2048 or 1048576), preallocated.
    case memfd(hugetlbKiB: Int?)

    func arguments(memoryMiB: Int) -> [String] {
        switch self {
        case .anonymous: return []
        case .memfd(let huge):
            var o = "memory-backend-memfd,id=ram0,size=\(memoryMiB)M,share=on"
            if let huge { o += ",hugetlb=on,hugetlbsize=\(huge)K,prealloc=on" }
            return ["-object", o, "-machine", "memory-backend=ram0"]
        }
    }
}

/// How to start a guest: memory, vCPUs, backing, devices, and whether it waits for an
/// incoming migration. The same configuration on both ends is what migration needs.
public struct GuestConfig: Sendable {
    public var memoryMiB: Int
    public var cpus: Int = 1
    public var backing: GuestBacking = .anonymous
    /// QEMU's `mem-merge` (MADV_MERGEABLE on guest RAM, so KSM scans it).
    public var merge: Bool = false
    /// A virtio-balloon device, and whether it offers free page reporting.
    public var balloon: Bool = false
    public var freePageReporting = true
    /// Added to the guest kernel's command line (`transparent_hugepage=never`, …).
    public var kernelArguments: [String] = []
    /// `-incoming URI`: the guest waits for a migration instead of booting.
    public var incoming: String?
    /// `-S`: the guest does not run until `cont` (a migration destination held for its check).
    public var startPaused = false

    public init(memoryMiB: Int, cpus: Int = 1) {
        self.memoryMiB = memoryMiB
        self.cpus = cpus
    }

    func arguments(image: GuestImage, console: String, agentSocket: String) -> [String] {
        var a = ["-m", "\(memoryMiB)M", "-smp", String(cpus), "-nodefaults", "-no-reboot", "-serial", "file:\(console)",
                 "-kernel", image.kernel, "-initrd", image.path,
                 "-append", (["console=ttyS0", "panic=-1", "quiet"] + kernelArguments).joined(separator: " "),
                 "-machine", "mem-merge=\(merge ? "on" : "off")",
                 "-device", "virtio-serial-pci,id=vser0",
                 "-chardev", "socket,id=agent0,path=\(agentSocket),server=on,wait=off",
                 "-device", "virtserialport,bus=vser0.0,chardev=agent0,name=\(GuestAgent.portName)"]
        a += backing.arguments(memoryMiB: memoryMiB)
        if balloon { a += ["-device", "virtio-balloon-pci,id=balloon0,free-page-reporting=\(freePageReporting ? "on" : "off")"] }
        if let incoming { a += ["-incoming", incoming] }
        if startPaused { a += ["-S"] }
        return a
    }
}

/// A guest running memlab's image, its console in a log, its agent answering. One that does
/// not come up fails with the console's last lines, and its QEMU is gone.
public final class Guest {
    public let qemu: QEMUProcess
    public let accelerator: Accelerator
    public let config: GuestConfig
    public let consolePath: String
    /// The agent, once it has answered HELLO (nil for a guest waiting for a migration).
    public private(set) var agent: GuestAgent?
    public private(set) var hello: AgentHello?
    /// QEMU started → agent's HELLO answered (host clock), and the guest's uptime then.
    public private(set) var bootTimeS: Double?
    public var guestUptimeS: Double? { hello.map { Double($0.uptimeNS) / 1e9 } }
    private let agentSocket: String
    private let started: UInt64

    /// Starts QEMU with `config`; unless it waits for a migration (or `waitForAgent` is false:
    /// several guests booting at once), waits for the agent within `timeoutS`.
    public init(image: GuestImage, config: GuestConfig, accelerator: Accelerator, directory: String,
                settingsGuard: SettingsGuard? = nil, timeoutS: Double, waitForAgent: Bool = true) throws {
        let tag = "\(accelerator.rawValue)-\(getpid())-\(Clock.nanoseconds() % 1_000_000_000)"
        consolePath = "\(directory)/console-\(tag).log"
        agentSocket = "\(directory)/agent-\(tag).sock"
        started = Clock.nanoseconds()
        qemu = try QEMUProcess(arguments: accelerator.qemuArguments + config.arguments(image: image, console: consolePath, agentSocket: agentSocket),
                               directory: directory, settingsGuard: settingsGuard, timeoutS: min(timeoutS, 30))
        self.accelerator = accelerator
        self.config = config
        if waitForAgent && config.incoming == nil && !config.startPaused {
            do { try connectAgent(timeoutS: timeoutS) } catch {
                qemu.stop(timeoutS: 1)
                throw error
            }
        }
    }

    deinit {
        agent?.close()
        unlink(agentSocket)
    }

    /// Connects to the agent and waits for its HELLO (a migrated guest's agent is the same
    /// process: call this on the destination after it runs).
    public func connectAgent(timeoutS: Double) throws {
        do {
            let a = try agent ?? GuestAgent(path: agentSocket, timeoutS: min(timeoutS, 10))
            agent = a
            hello = try a.hello(timeoutS: timeoutS)
            if bootTimeS == nil { bootTimeS = Clock.seconds(since: started) }
        } catch {
            agent?.close()
            agent = nil
            let how = qemu.exited().map { "QEMU ended (\($0)); " } ?? ""
            throw SystemError(errno: ETIMEDOUT, call: "the guest under \(accelerator.rawValue) did not answer (\(error)); \(how)console: \(QEMUProcess.tail(consolePath))")
        }
    }

    /// The agent, or an error saying the guest has none connected.
    public func requireAgent() throws -> GuestAgent {
        guard let agent else { throw SystemError(errno: ENOTCONN, call: "the guest's agent is not connected") }
        return agent
    }

    /// Stops QEMU (quit, then SIGKILL) and forgets the agent.
    @discardableResult
    public func stop(timeoutS: Double = 2) -> ChildExit? {
        agent?.close()
        agent = nil
        return qemu.stop(timeoutS: timeoutS)
    }

    /// The accelerator a guest really runs under here: KVM if a guest answers under it within
    /// `kvmTimeoutS`, else TCG, with why KVM was not used. Tried once a process.
    public static func probeAccelerator(image: GuestImage, directory: String, kvmTimeoutS: Double = 20) -> (Accelerator, String?) {
        probed.withLock { cached in
            if let cached { return cached }
            let r = tryKVM(image: image, directory: directory, timeoutS: kvmTimeoutS)
            cached = r
            return r
        }
    }

    private static let probed = Lock<(Accelerator, String?)?>(nil)

    private static func tryKVM(image: GuestImage, directory: String, timeoutS: Double) -> (Accelerator, String?) {
        guard access("/dev/kvm", R_OK | W_OK) == 0 else { return (.tcg, "/dev/kvm is not there or not usable") }
        do {
            let g = try Guest(image: image, config: GuestConfig(memoryMiB: 128), accelerator: .kvm, directory: directory, timeoutS: timeoutS)
            g.stop()
            return (.kvm, nil)
        } catch {
            return (.tcg, "a guest did not boot under KVM (\(error))")
        }
    }
}
