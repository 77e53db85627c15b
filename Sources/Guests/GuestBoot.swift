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

/// A guest booted from a `GuestImage`, its console in a log, up to its ready line.
public final class BootedGuest {
    public let qemu: QEMUProcess
    public let accelerator: Accelerator
    public let consolePath: String
    /// QEMU started → ready line on the console (host clock), and the guest's own uptime then.
    public let bootTimeS: Double
    public let guestUptimeS: Double?
    /// How QEMU had already ended when the ready line was read (a guest that powers off at
    /// once), or nil: then `qemu.exited()` / `qemu.stop` tell.
    public let endedAtReady: ChildExit?

    /// Boots `image` with `memoryMiB` under `accelerator`; fails with the console's last lines
    /// when QEMU exits first or the ready line does not come within `timeoutS`.
    public init(image: GuestImage, memoryMiB: Int, accelerator: Accelerator, directory: String,
                settingsGuard: SettingsGuard? = nil, timeoutS: Double) throws {
        let console = "\(directory)/console-\(accelerator.rawValue)-\(Clock.nanoseconds() % 1_000_000_000).log"
        let start = Clock.nanoseconds()
        let q = try QEMUProcess(arguments: accelerator.qemuArguments + [
            "-m", String(memoryMiB), "-nodefaults", "-no-reboot", "-serial", "file:\(console)",
            "-kernel", image.kernel, "-initrd", image.path, "-append", "console=ttyS0 panic=-1 quiet",
        ], directory: directory, settingsGuard: settingsGuard, timeoutS: timeoutS)
        var ended: ChildExit?
        while true {
            // Whether QEMU has ended is read *before* the console: a guest that prints its ready
            // line and powers off at once is ready, not a failure.
            ended = q.exited()
            // The whole ready line, found in bytes: the serial console ends lines with \r\n,
            // one Character in Swift, and firmware and kernel write bytes that are not UTF-8.
            if let line = Self.readyLine(FileManager.default.contents(atPath: console)) {
                guestUptimeS = line.split(separator: " ").last.flatMap { Double($0) }
                break
            }
            if let end = ended {
                throw SystemError(errno: ECHILD, call: "the guest under \(accelerator.rawValue) ended (\(end)) before it was ready; QEMU: \(QEMUProcess.tail(q.logPath)); console: \(QEMUProcess.tail(console))")
            }
            if Clock.seconds(since: start) > timeoutS {
                q.stop(timeoutS: 1)
                throw SystemError(errno: ETIMEDOUT, call: "the guest under \(accelerator.rawValue) was not ready within \(timeoutS) s; console: \(QEMUProcess.tail(console))")
            }
            Clock.sleep(nanoseconds: 20_000_000)
        }
        bootTimeS = Clock.seconds(since: start)
        endedAtReady = ended
        qemu = q
        self.accelerator = accelerator
        consolePath = console
    }

    /// The text after the ready marker up to the end of its line, once the line is whole.
    static func readyLine(_ data: Data?) -> String? {
        guard let data, let r = data.range(of: Data(GuestImage.readyMarker.utf8)),
              let nl = data[r.upperBound...].firstIndex(of: 0x0A) else { return nil }
        return String(decoding: data[r.upperBound..<nl].filter { $0 != 0x0D }, as: UTF8.self)
    }

    /// The accelerator a guest really boots under here: KVM if a guest boots with it within
    /// `kvmTimeoutS`, else TCG, with why KVM was not used.
    public static func probeAccelerator(image: GuestImage, directory: String, kvmTimeoutS: Double = 20) -> (Accelerator, String?) {
        guard access("/dev/kvm", R_OK | W_OK) == 0 else { return (.tcg, "/dev/kvm is not there or not usable") }
        do {
            let g = try BootedGuest(image: image, memoryMiB: 128, accelerator: .kvm, directory: directory, timeoutS: kvmTimeoutS)
            g.qemu.stop(timeoutS: 2)
            return (.kvm, nil)
        } catch {
            return (.tcg, "a guest did not boot under KVM (\(error))")
        }
    }
}
