#if canImport(Glibc)
import Glibc
#endif
import Foundation
import LabKit
import LinuxMM

/// The guest agent, compiled by memlab from this repository's `guest/agent.c` into a static
/// binary (libc only) and cached in the state directory under the hash of its source, so an
/// edited agent is rebuilt and an unchanged one reused. The source is found from where this
/// file was compiled: memlab runs from its build tree (`swift run`, the scripts).
public enum AgentBinary {
    public static let source: String = {
        var url = URL(fileURLWithPath: #filePath)
        for _ in 0..<3 { url.deleteLastPathComponent() }   // Sources/Guests/AgentBinary.swift
        return url.appendingPathComponent("guest/agent.c").path
    }()

    /// A C compiler that links statically (gcc from Debian, or the Swift toolchain's clang).
    public static var compiler: String? {
        ["/usr/bin/cc", "/usr/bin/gcc", "/opt/swift/usr/bin/clang", "/usr/bin/clang"].first { access($0, X_OK) == 0 }
    }

    /// Why the agent cannot be built here, or nil.
    public static var missing: String? {
        if access(source, R_OK) != 0 { return "the agent's source \(source) is not here (memlab runs from its build tree)" }
        if compiler == nil { return "no C compiler for the guest agent: apt-get install gcc libc6-dev" }
        if access("/usr/lib/x86_64-linux-gnu/libc.a", R_OK) != 0 && access("/usr/lib/libc.a", R_OK) != 0 {
            return "no static libc for the guest agent: apt-get install libc6-dev"
        }
        return nil
    }

    /// The agent binary in `directory`, compiled first if its source changed.
    public static func build(directory: String) throws -> String {
        if let why = missing { throw SystemError(errno: ENOENT, call: why) }
        let text = try Data(contentsOf: URL(fileURLWithPath: source))
        let path = "\(directory)/memlab-agent-\(String(fnv1a(text), radix: 16))"
        if ProcFile.exists(path) { return path }
        let partial = "\(path).\(getpid()).partial"
        let log = "\(directory)/agent-build.log"
        let pid = try ChildProcess.spawn(compiler!, ["-static", "-O2", "-pthread", "-Wall", "-o", partial, source], outputPath: log)
        let exit = ChildProcess.wait(pid, deadline: 120)
        guard exit == .exited(0), ProcFile.exists(partial) else {
            unlink(partial)
            throw SystemError(errno: EIO, call: "compile the guest agent (\(exit)): \(QEMUProcess.tail(log))")
        }
        guard rename(partial, path) == 0 else { let e = SystemError.current("rename", path: path); unlink(partial); throw e }
        unlink(log)
        GuestImage.prune(directory: directory, prefix: "memlab-agent-", keeping: path)
        return path
    }

    static func fnv1a(_ data: Data) -> UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in data { h ^= UInt64(b); h &*= 0x0000_0100_0000_01b3 }
        return h
    }
}
