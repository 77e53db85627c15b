#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import Foundation
import LinuxMM
import Synchronization

/// On SIGINT, SIGTERM or SIGHUP: stop borrowing, kill the running child, give back every
/// borrowed setting, remove the run's files, say so, and exit 128+signal. A C handler only
/// writes the signal number to a pipe; a dedicated thread reads it and does the work, so it
/// may take locks and do I/O. (The handler is installed with sigaction, so it works even when
/// the shell started memlab with SIGINT ignored, as non-interactive shells do for background
/// jobs.)
///
/// Order matters: the guard is sealed first, under its own lock, so a run that is borrowing
/// right now finishes that one write and every later attempt fails — nothing is borrowed
/// after the restore. Threads that reach a `checkpoint()` once memlab is stopping park there
/// until the exit.
public final class SignalCleanup: Sendable {
    public static let shared = SignalCleanup()

    private let child = Lock<pid_t>(0)
    private let guardRef = Lock<SettingsGuard?>(nil)
    private let installed = Atomic<Bool>(false)
    private let stopping = Atomic<Int32>(0)

    /// Installs the handler (once) and names the guard to restore, if any. Every command
    /// installs it at start, so Ctrl-C ends any of them the same way — also one started from
    /// a script whose shell left SIGINT ignored for background jobs.
    public func install(settingsGuard: SettingsGuard?) {
        if let settingsGuard { guardRef.withLock { $0 = settingsGuard } }
        guard !installed.exchange(true, ordering: .sequentiallyConsistent) else { return }
        var fds: [Int32] = [-1, -1]
        guard memlab_pipe2(&fds, O_CLOEXEC) == 0 else {
            writeStderr("memlab: warning: no signal pipe (\(SystemError.current("pipe2"))); Ctrl-C will not restore settings until the next memlab start\n")
            return
        }
        let readFD = fds[0]
        // The signal thread lives as long as the process: detached, never joined.
        do throws(SystemError) {
            try OSThread { [self] in
                var b: UInt8 = 0
                while true {
                    let n = read(readFD, &b, 1)
                    if n == 1 { self.handle(Int32(b)) }
                    if n < 0 && errno != EINTR { return }
                }
            }.detach()
        } catch {
            writeStderr("memlab: warning: no signal thread (\(error)); Ctrl-C will not restore settings until the next memlab start\n")
            return
        }
        let signals: [Int32] = [SIGINT, SIGTERM, SIGHUP]
        _ = signals.withUnsafeBufferPointer { memlab_install_signal_pipe(fds[1], $0.baseAddress, Int32($0.count)) }
        // A parent (a test runner, a service manager) may have left them blocked in the mask
        // memlab inherited: then no handler would ever run.
        var set = sigset_t()
        sigemptyset(&set)
        for sig in signals { sigaddset(&set, sig) }
        pthread_sigmask(SIG_UNBLOCK, &set, nil)
    }

    /// The signal memlab is stopping for, or 0.
    public var stoppingSignal: Int32 { stopping.load(ordering: .acquiring) }

    /// The running child, killed on a signal. A child registered once memlab is stopping is
    /// killed at once (it was spawned in the instant before the runner noticed).
    public func setChild(_ pid: pid_t) {
        let late = child.withLock { c -> Bool in
            c = pid
            return stopping.load(ordering: .acquiring) != 0
        }
        if late && pid > 0 { kill(pid, SIGKILL) }
    }

    /// Where a thread that would start something new (a run, a child, a write) parks for good
    /// once memlab is stopping: the signal thread exits the process.
    public func checkpoint() {
        guard stopping.load(ordering: .acquiring) != 0 else { return }
        while true { pause() }
    }

    private func handle(_ sig: Int32) {
        guard stopping.compareExchange(expected: 0, desired: sig, ordering: .acquiringAndReleasing).exchanged else { return }
        let name = sig == SIGINT ? "SIGINT" : sig == SIGTERM ? "SIGTERM" : "SIGHUP"
        let g = guardRef.withLock { $0 }
        g?.seal("interrupted by \(name)")
        // Killed and waited for without reaping (the runner's thread reaps it): the child is
        // set only while it has not ended, so its pid is still its own.
        // What the child started (a QEMU guest, dying with it) becomes this process's child
        // instead of init's, so RunDirectory.removeOwn can wait for it and reap it before exit.
        _ = memlab_prctl(memlab_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        child.withLock { pid in
            if pid > 0 {
                kill(pid, SIGKILL)
                while memlab_child_ended(pid, 1) < 0 && errno == EINTR {}
            }
        }
        var message = "\nmemlab: interrupted by \(name)"
        if let g {
            // The run's own thread may have seen its child die (killed just now) and restored
            // first; then its report is the one to show.
            var report = g.restoreAll()
            if report.restoredLines.isEmpty && report.failures.isEmpty, let earlier = g.lastRestoreReport { report = earlier }
            g.releaseLock()
            if !report.restoredLines.isEmpty {
                message += "; settings restored:\n" + report.restoredLines.map { "  \($0)" }.joined(separator: "\n")
            } else {
                message += "; no setting was borrowed at that moment (journal \(g.journalPath))"
            }
            if !report.failures.isEmpty {
                message += "\nmemlab: could NOT restore:\n" + report.failures.map { "  \($0)" }.joined(separator: "\n")
                    + "\nrun `memlab restore` as root"
            }
        }
        RunDirectory.removeOwn()
        // An output being written is finished first; none starts after (the gate is held
        // through the exit).
        ResultOutput.gate.withLock { _ in
            writeStderr(message + "\n")
            _exit(128 + sig)
        }
    }
}
