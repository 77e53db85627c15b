#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import LinuxMM

/// How a child process ended.
public enum ChildExit: Sendable, Equatable {
    case exited(Int32)
    case signaled(Int32)
    case timedOut(Double)
}

/// Spawns a child (memlab re-executing itself) with every signal at its default, stdin from
/// /dev/null and stdout+stderr into a file, and waits for it with a deadline. A deadline
/// passed means SIGKILL.
public enum ChildProcess {
    /// The running memlab binary, for re-executing itself.
    public static var selfExecutable: String {
        var buf = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buf, buf.count - 1)
        return n > 0 ? String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : CommandLine.arguments[0]
    }

    public static func spawn(_ executable: String, _ arguments: [String], outputPath: String) throws(SystemError) -> pid_t {
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        _ = memlab_spawnattr_clean(&attr)
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, outputPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        _ = memlab_spawn_closefrom(&actions, 3)
        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        // The Swift backtracer would take its time over a crash we expect and bury the
        // runtime's one-line reason under a backtrace: off in children.
        var env: [UnsafeMutablePointer<CChar>?] = []
        var p = environ
        while let e = p.pointee {
            if !String(cString: e).hasPrefix("SWIFT_BACKTRACE=") { env.append(strdup(e)) }
            p += 1
        }
        env.append(strdup("SWIFT_BACKTRACE=enable=no"))
        env.append(nil)
        defer { env.forEach { free($0) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, executable, &actions, &attr, argv, env)
        if rc != 0 { throw SystemError(errno: rc, call: "posix_spawn", path: executable) }
        return pid
    }

    /// Waits for `pid` until `deadline` seconds have passed, then kills it. `exited` runs once
    /// the child has ended but before it is reaped: while it is a zombie its pid cannot be
    /// reused, so whoever may still signal that pid (the signal handler) can forget it safely.
    public static func wait(_ pid: pid_t, deadline: Double, exited: () -> Void = {}) -> ChildExit {
        let start = Clock.nanoseconds()
        let pidfd = memlab_pidfd_open(pid)
        defer { if pidfd >= 0 { close(pidfd) } }
        func reap() -> Int32 {
            exited()
            var status: Int32 = 0
            while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
            return status
        }
        while true {
            let rc = memlab_child_ended(pid, 0)
            if rc == 1 {
                let status = reap()
                if memlab_wifexited(status) != 0 { return .exited(memlab_wexitstatus(status)) }
                if memlab_wifsignaled(status) != 0 { return .signaled(memlab_wtermsig(status)) }
                return .exited(-1)
            }
            if rc < 0 && errno != EINTR { exited(); return .exited(-1) }
            let elapsed = Clock.seconds(since: start)
            if elapsed >= deadline {
                kill(pid, SIGKILL)
                _ = reap()
                return .timedOut(elapsed)
            }
            let remainingMS = Int32(min(100.0, (deadline - elapsed) * 1000).rounded(.up))
            if pidfd >= 0 {
                var p = pollfd(fd: pidfd, events: Int16(POLLIN), revents: 0)
                _ = poll(&p, 1, max(remainingMS, 1))
            } else {
                Clock.sleep(nanoseconds: 2_000_000)
            }
        }
    }

    public static func signalName(_ sig: Int32) -> String {
        switch sig {
        case SIGKILL: return "SIGKILL"
        case SIGSEGV: return "SIGSEGV"
        case SIGBUS: return "SIGBUS"
        case SIGABRT: return "SIGABRT"
        case SIGILL: return "SIGILL"
        case SIGTRAP: return "SIGTRAP"
        case SIGTERM: return "SIGTERM"
        case SIGINT: return "SIGINT"
        case SIGFPE: return "SIGFPE"
        default: return "signal \(sig)"
        }
    }
}
