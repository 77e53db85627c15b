#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import Guests
import LabKit
import LinuxMM
import Testing

/// QMP as QEMU 7.2 speaks it: the parser on lines captured from a real QEMU (2026-12-02), on
/// garbage, and a real QEMU started, driven and stopped.
@Suite struct QMPParsing {
    // Captured from qemu-system-x86_64 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3).
    static let greeting = #"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}"#
    static let status = #"{"return": {"status": "prelaunch", "singlestep": false, "running": false}}"#
    static let kvm = #"{"return": {"enabled": true, "present": true}}"#
    static let resume = #"{"timestamp": {"seconds": 1796227803, "microseconds": 584216}, "event": "RESUME"}"#
    static let refused = #"{"error": {"class": "CommandNotFound", "desc": "The command nonesuch has not been found"}}"#

    @Test func whatQEMUSendsIsRead() throws {
        #expect(try QMPMessage.parse(Array(Self.greeting.utf8)) == .greeting(version: "7.2.22"))
        guard case .returned(let s) = try QMPMessage.parse(Array(Self.status.utf8)) else { Issue.record("not a return"); return }
        #expect(s["status"]?.string == "prelaunch" && s["running"]?.bool == false)
        guard case .returned(let k) = try QMPMessage.parse(Array(Self.kvm.utf8)) else { Issue.record("not a return"); return }
        #expect(k["enabled"]?.bool == true)
        guard case .event(let e) = try QMPMessage.parse(Array(Self.resume.utf8)) else { Issue.record("not an event"); return }
        #expect(e.name == "RESUME" && e.seconds == 1_796_227_803 && e.microseconds == 584_216)
        #expect(try QMPMessage.parse(Array(Self.refused.utf8)) == .error(errorClass: "CommandNotFound", desc: "The command nonesuch has not been found"))
    }

    @Test(arguments: ["", "not json", "[1,2]", "\"text\"", "{\"neither\": 1}", "{\"return\": ", String(repeating: "[", count: 100_000)])
    func garbageIsRefusedNotTrapped(_ line: String) {
        #expect(throws: QMPError.self) { try QMPMessage.parse(Array(line.utf8)) }
    }

    @Test func anOverlongLineIsRefusedBeforeItIsRead() {
        let line = [UInt8](repeating: 0x20, count: QMPMessage.maxLine + 1)
        #expect(throws: QMPError.malformed("a line of \(QMPMessage.maxLine + 1) bytes (at most \(QMPMessage.maxLine))")) { try QMPMessage.parse(line) }
    }

    @Test func integersAreOnlyExactOnes() {
        #expect(JSONValue.number(4096).int == 4096)
        #expect(JSONValue.number(1.5).int == nil)
        #expect(JSONValue.number(1e300).int == nil)
        #expect(JSONValue.number(.infinity).int == nil)
    }
}

@Suite(.serialized, .enabled(if: QEMUProcess.missing == nil, "\(QEMUProcess.missing ?? "")")) struct RealQEMU {
    @Test func aPausedMachineRunsAndQuitsAndLeavesNothing() throws {
        let tmp = TempDir()
        let dir = tmp.path
        // TCG: whatever /dev/kvm is, this test needs QMP only (no guest kernel).
        let q = try QEMUProcess(arguments: ["-S", "-nodefaults", "-machine", "q35,accel=tcg", "-m", "64"], directory: dir)
        #expect(q.qmp.version.hasPrefix("7.") || q.qmp.version.hasPrefix("8.") || q.qmp.version.hasPrefix("9."))
        #expect(try q.qmp.execute("query-status", timeoutS: 5)["status"]?.string == "prelaunch")
        try q.qmp.execute("cont", timeoutS: 5)
        _ = try q.qmp.waitForEvent("RESUME", timeoutS: 5)
        #expect(try q.qmp.execute("query-status", timeoutS: 5)["running"]?.bool == true)
        #expect(throws: QMPError.self) { try q.qmp.execute("nonesuch", timeoutS: 5) }
        let pid = q.pid
        #expect(q.stop(timeoutS: 5) == .exited(0))
        #expect(kill(pid, 0) != 0 && errno == ESRCH)
    }

    @Test func aQEMUThatCannotStartFailsWithItsLog() throws {
        let tmp = TempDir()
        let dir = tmp.path
        let t0 = Clock.nanoseconds()
        defer { #expect(Clock.seconds(since: t0) < 2.5, "a QEMU that exits is reported when it exits, not at the deadline") }
        do {
            _ = try QEMUProcess(arguments: ["-machine", "no-such-machine"], directory: dir, timeoutS: 10)
            Issue.record("QEMU with a machine it lacks started")
        } catch {
            // QEMU's own words, at once: not a QMP timeout.
            #expect("\(error)".contains("unsupported machine type") && "\(error)".contains("exited with status 1"), "\(error)")
        }
    }
}

@Suite struct DyingWithParent {
    /// PDEATHSIG is set between fork and exec: the child is killed when the process that
    /// started it dies, whatever killed that. Shown with /bin/sleep started by a forked
    /// process that then exits at once.
    @Test func aChildDiesWithTheProcessThatStartedIt() throws {
        let tmp = TempDir()
        let words: [String] = ["/bin/sleep", "60"]
        let argv: [UnsafeMutablePointer<CChar>?] = words.map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        let log = strdup(tmp.file("sleep.log"))
        defer { free(log) }
        var fds: [Int32] = [-1, -1]
        #expect(pipe(&fds) == 0)
        // Everything the forked process does is async-signal-safe (memlab_spawn_dying_with_parent
        // is fork, prctl, open, dup2, exec; then write and _exit).
        let middle = fork()
        if middle == 0 {
            var pid = memlab_spawn_dying_with_parent("/bin/sleep", argv, log)
            _ = write(fds[1], &pid, MemoryLayout<pid_t>.size)
            _exit(0)
        }
        close(fds[1])
        var grandchild: pid_t = 0
        let n = read(fds[0], &grandchild, MemoryLayout<pid_t>.size)
        close(fds[0])
        var status: Int32 = 0
        waitpid(middle, &status, 0)
        #expect(n == MemoryLayout<pid_t>.size && grandchild > 0)
        guard grandchild > 0 else { return }
        // Its parent is gone: it must be gone (or a zombie for init to reap) within a moment.
        let start = Clock.nanoseconds()
        var state = "?"
        while Clock.seconds(since: start) < 5 {
            guard let stat = ProcFile.readIfPresent("/proc/\(grandchild)/stat") else { state = "gone"; break }
            state = stat.split(separator: ")").last.map { String($0.split(separator: " ").first ?? "?") } ?? "?"
            if state == "Z" || state == "X" { break }
            Clock.sleep(nanoseconds: 10_000_000)
        }
        if state != "gone" && state != "Z" && state != "X" { kill(grandchild, SIGKILL) }
        #expect(state == "gone" || state == "Z" || state == "X", "/bin/sleep outlived the process that started it (state \(state))")
    }
}

extension KernelTests {
@Suite(.serialized, .enabled(if: GuestImage.missing == nil, "\(GuestImage.missing ?? "")")) struct GuestBootTests {
    /// A guest built from Debian's kernel, busybox and memlab's agent boots until the agent
    /// answers; KVM is tried first and used only if a guest really boots under it; the agent
    /// fills, checksums and frees memory and reports the guest's meminfo; QEMU is gone after.
    @Test func aGuestBootsAndItsAgentAnswers() throws {
        let tmp = TempDir()
        let image = try GuestImage.build(directory: tmp.path)
        // The same inputs make the same image: built once, then found.
        #expect(try GuestImage.build(directory: tmp.path).path == image.path)
        let (accel, why) = Guest.probeAccelerator(image: image, directory: tmp.path)
        if let why { print("accelerator: tcg (\(why))") }
        let guest = try Guest(image: image, config: GuestConfig(memoryMiB: 256), accelerator: accel, directory: tmp.path, timeoutS: 90)
        let hello = try #require(guest.hello)
        print("boot to agent: \(guest.bootTimeS ?? -1) s under \(accel.rawValue) (guest uptime \(guest.guestUptimeS ?? -1) s, kernel \(hello.kernelRelease))")
        #expect(hello.kernelRelease == image.kernelRelease)
        #expect(hello.pageSize == 4096)
        #expect(hello.memTotalBytes > 128 << 20 && hello.memTotalBytes <= 256 << 20)
        let agent = try guest.requireAgent()
        let before = try agent.meminfo(timeoutS: 10)
        let fill = try agent.fill(region: 0, bytes: 16 << 20, seed: 7, timeoutS: 60)
        #expect(fill.pages == 4096)
        #expect(try agent.checksum(region: 0, timeoutS: 30).checksum == fill.checksum)
        let after = try agent.meminfo(timeoutS: 10)
        #expect(before.memTotal == hello.memTotalBytes)
        // 16 MiB touched in the guest: MemFree fell by about that much.
        let fell = Int64(before["MemFree"] ?? 0) - Int64(after["MemFree"] ?? 0)
        #expect(fell > 14 << 20, "MemFree fell by \(fell)")
        // A bad request is an ERROR frame, not a dead agent.
        #expect(throws: AgentError.self) { try agent.free(region: 9, timeoutS: 10) }
        try agent.free(region: 0, timeoutS: 10)
        let pid = guest.qemu.pid
        guest.stop()
        #expect(kill(pid, 0) != 0 && errno == ESRCH)
    }
}
}
