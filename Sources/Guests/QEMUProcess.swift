#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import Foundation
import LabKit
import LinuxMM
import Transfer

/// One QEMU process under the runner's rules: a child of this memlab that dies with it
/// (PDEATHSIG, set between fork and exec), recorded in the settings journal when a guard is
/// given (so the next memlab start kills one a SIGKILLed memlab left), its QMP socket and
/// console log in the run's directory, killed and reaped by `stop` or `deinit` — never leaked.
public final class QEMUProcess {
    public static let binary = "/usr/bin/qemu-system-x86_64"
    /// Why QEMU cannot run here, or nil.
    public static var missing: String? {
        access(binary, X_OK) == 0 ? nil : "\(binary) not found: apt-get install --no-install-recommends qemu-system-x86"
    }

    public let pid: pid_t
    public let qmp: QMPClient
    /// QEMU's stdout and stderr (the guest's console when it is on stdio).
    public let logPath: String
    private var reaped = false
    /// How it ended, once reaped (every later `exited()` returns it).
    private var ending: ChildExit?
    private let settingsGuard: SettingsGuard?
    /// Its record in the run directory (killed by the next memlab if this one dies).
    private let record: String?

    /// Starts `qemu-system-x86_64 ARGUMENTS -qmp … -display none` in `directory` and connects
    /// QMP within `timeoutS`; on any failure QEMU is killed and the error carries the last
    /// lines of its log.
    public init(arguments: [String], directory: String, settingsGuard: SettingsGuard? = nil, timeoutS: Double = 10) throws {
        let socketPath = "\(directory)/qmp-\(getpid())-\(Clock.nanoseconds() % 1_000_000_000).sock"
        logPath = "\(directory)/qemu-\(getpid())-\(Clock.nanoseconds() % 1_000_000_000).log"
        self.settingsGuard = settingsGuard
        let argv = [Self.binary] + arguments + ["-qmp", "unix:\(socketPath),server=on,wait=off", "-display", "none"]
        let cargs = argv.map { strdup($0) } + [nil]
        defer { cargs.forEach { free($0) } }
        let p = memlab_spawn_dying_with_parent(Self.binary, cargs, logPath)
        if p < 0 { throw SystemError.current("fork/exec", path: Self.binary) }
        pid = p
        settingsGuard?.recordProcess(p)
        record = RunDirectory.recordProcess(p)
        // QEMU makes the socket early in its start; one that exits first (a bad option, a
        // missing firmware) is reported at once, with its own words, not after the deadline.
        let start = Clock.nanoseconds()
        while !ProcFile.exists(socketPath) && Clock.seconds(since: start) < timeoutS {
            var s: Int32 = 0
            if waitpid(p, &s, WNOHANG) == p {
                settingsGuard?.forgetProcess(p)
                if let record { unlink(record) }
                let how = memlab_wifsignaled(s) != 0 ? "was killed by \(ChildProcess.signalName(memlab_wtermsig(s)))" : "exited with status \(memlab_wexitstatus(s))"
                throw SystemError(errno: ECHILD, call: "QEMU \(how) before it listened on QMP; its log ends: \(Self.tail(logPath))")
            }
            Clock.sleep(nanoseconds: 5_000_000)
        }
        do {
            qmp = try QMPClient(path: socketPath, timeoutS: max(timeoutS - Clock.seconds(since: start), 0.5))
        } catch {
            kill(p, SIGKILL)
            var s: Int32 = 0
            while waitpid(p, &s, 0) < 0 && errno == EINTR {}
            settingsGuard?.forgetProcess(p)
            if let record { unlink(record) }
            unlink(socketPath)
            throw SystemError(errno: EIO, call: "QEMU did not answer on QMP (\(error)); its log ends: \(Self.tail(logPath))")
        }
        unlink(socketPath)   // connected: the path is no longer needed
    }

    deinit { _ = stop(timeoutS: 2) }

    /// How QEMU ended, if it has (reaped here, and remembered); nil while it runs.
    public func exited() -> ChildExit? {
        guard !reaped else { return ending }
        var s: Int32 = 0
        guard waitpid(pid, &s, WNOHANG) == pid else { return nil }
        reaped = true
        qmp.close()
        settingsGuard?.forgetProcess(pid)
        if let record { unlink(record) }
        ending = memlab_wifsignaled(s) != 0 ? .signaled(memlab_wtermsig(s)) : .exited(memlab_wexitstatus(s))
        return ending
    }

    /// Asks QEMU to quit (QMP `quit`), waits up to `timeoutS`, then SIGKILLs; reaps it.
    @discardableResult
    public func stop(timeoutS: Double) -> ChildExit? {
        guard !reaped else { return nil }
        reaped = true
        _ = try? qmp.execute("quit", timeoutS: min(timeoutS, 1))
        qmp.close()
        let exit = ChildProcess.wait(pid, deadline: timeoutS)
        settingsGuard?.forgetProcess(pid)
        if let record { unlink(record) }
        ending = exit
        return exit
    }

    /// The last lines of a log, for a reason (at most 1 KiB, made printable).
    public static func tail(_ path: String) -> String {
        guard let data = FileManager.default.contents(atPath: path) else { return "(no log)" }
        let text = String(decoding: data, as: UTF8.self)
        let lines = text.split(separator: "\n").suffix(5).joined(separator: " | ")
        return PeerText.decode(Array(lines.utf8.suffix(1024)))
    }
}
