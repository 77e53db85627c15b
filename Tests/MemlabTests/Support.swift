#if canImport(Glibc)
import Glibc
#endif
import Foundation
import LabKit
import Testing

/// Runs the real memlab binary, as a user would. The binary sits beside the test bundle in
/// the build directory (or MEMLAB_BIN names it).
enum Memlab {
    static var binary: String {
        if let b = ProcessInfo.processInfo.environment["MEMLAB_BIN"] { return b }
        var buf = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buf, buf.count - 1)
        let exe = String(decoding: buf[0..<max(n, 0)].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return (exe as NSString).deletingLastPathComponent + "/memlab"
    }

    struct Output {
        var status: Int32
        var stdout: String
        var stderr: String

        /// What went wrong first, then everything: stderr, then each run that did not end ok and
        /// each check that disagreed (with the run it belongs to), then the whole table. CI shows
        /// only the head of a failing expectation's message; the cause must be in it.
        var why: String {
            var run = "", lines: [String] = []
            for line in stdout.split(separator: "\n", omittingEmptySubsequences: false) {
                if line.contains("  status: ") { run = String(line) }
                if line.contains("  status: ") && !line.contains("status: ok") { lines.append(String(line)) }
                else if line.contains("DISAGREES") || line.contains("reason:") || line.contains("NOT restored") { lines.append("\(run.trimmingCharacters(in: .whitespaces)) → \(line)") }
            }
            return "exit \(status)\nstderr:\n\(stderr)\nnot ok:\n\(lines.joined(separator: "\n"))\n--- the whole output:\n\(stdout)"
        }
    }

    /// A private state directory per test, so a test's journal never meets a real one.
    static func environment(stateDir: String) -> [String: String] {
        var env = ProcessInfo.processInfo.environment
        env["MEMLAB_STATE_DIR"] = stateDir
        return env
    }

    static func start(_ args: [String], stateDir: String, prefix: [String] = [], env extra: [String: String] = [:]) throws -> (Process, Pipe, Pipe) {
        let p = Process()
        if prefix.isEmpty {
            p.executableURL = URL(fileURLWithPath: binary)
            p.arguments = args
        } else {
            p.executableURL = URL(fileURLWithPath: prefix[0])
            p.arguments = Array(prefix.dropFirst()) + [binary] + args
        }
        p.environment = environment(stateDir: stateDir).merging(extra) { $1 }
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        return (p, out, err)
    }

    @discardableResult
    static func run(_ args: [String], stateDir: String, prefix: [String] = [], env extra: [String: String] = [:]) throws -> Output {
        let (p, out, err) = try start(args, stateDir: stateDir, prefix: prefix, env: extra)
        // Read both before waiting, at once: a child that fills one pipe while we wait on the
        // other would block for ever.
        let e = Box<Data>(Data())
        let done = DispatchSemaphore(value: 0)
        Thread { e.value = err.fileHandleForReading.readDataToEndOfFile(); done.signal() }.start()
        let o = out.fileHandleForReading.readDataToEndOfFile()
        done.wait()
        p.waitUntilExit()
        return Output(status: p.terminationStatus, stdout: String(decoding: o, as: UTF8.self), stderr: String(decoding: e.value, as: UTF8.self))
    }
}

/// The machine-wide settings memlab may borrow, read directly from the kernel: a test takes
/// one before and compares after, so "the machine reads exactly as before" is asserted, not
/// assumed.
/// The machine's memory settings and what runs may leave, as `memlab settings` prints them
/// (LabKit's `WatchedSettings`: the one list). Without temporary files, journals and hugetlb
/// pages in use: tests outside the serialized kernel suite may hold those for a moment while a
/// test compares; `scripts/test` compares the whole picture before and after the suite.
struct KnobSnapshot: Equatable, CustomStringConvertible {
    var lines: [String]
    /// name → value (for the lines whose name appears once: knobs and counts).
    var values: [String: String] {
        var v: [String: String] = [:]
        for l in lines { if let eq = l.firstIndex(of: "=") { v[String(l[..<eq])] = String(l[l.index(after: eq)...]) } }
        return v
    }

    static let momentary = ["leftover_file=", "registered_journal=", "journal=", "hugetlb_in_use="]

    static func take() -> KnobSnapshot {
        KnobSnapshot(lines: WatchedSettings.snapshot().filter { l in !momentary.contains { l.hasPrefix($0) } })
    }

    var description: String { lines.joined(separator: "\n") }
}

let isRoot = geteuid() == 0
let hasKSM = FileManager.default.fileExists(atPath: "/sys/kernel/mm/ksm/run")
let hasMemoryCgroup: Bool = {
    let mounts = (try? String(contentsOfFile: "/proc/self/mounts", encoding: .utf8)) ?? ""
    return mounts.split(separator: "\n").contains { line in
        let f = line.split(separator: " ")
        return f.count > 3 && ((f[2] == "cgroup" && f[3].split(separator: ",").contains("memory")) || f[2] == "cgroup2")
    }
}()
let hasSetpriv = FileManager.default.isExecutableFile(atPath: "/usr/bin/setpriv")
/// Set by scripts/sanitize: the memlab under test is built with this sanitizer. A few tests
/// measure what the sanitizer itself changes (page faults and memory of its shadow, a strict
/// overcommit mode its shadow reservation cannot pass) and skip, saying so.
let sanitizer = ProcessInfo.processInfo.environment["MEMLAB_SANITIZER"]

/// A scratch directory removed at the end of the test.
final class TempDir {
    let path: String
    init() {
        var template = Array("/tmp/memlab-test.XXXXXX".utf8CString)
        path = String(cString: mkdtemp(&template)!)
        chmod(path, 0o777)
    }
    deinit {
        // A test that failed half-way may leave a killed runner's journal here: give the
        // machine its settings back before the journal is deleted with the directory.
        if FileManager.default.fileExists(atPath: file("journal.json")) {
            _ = try? Memlab.run(["restore"], stateDir: path)
        }
        try? FileManager.default.removeItem(atPath: path)
    }
    func file(_ name: String) -> String { "\(path)/\(name)" }
}

func loadJSON(_ path: String) throws -> [String: Any] {
    let data = try #require(FileManager.default.contents(atPath: path), "no result at \(path)")
    return try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
}

func runs(_ doc: [String: Any]) -> [[String: Any]] { doc["runs"] as? [[String: Any]] ?? [] }

func metric(_ run: [String: Any], _ name: String) -> [String: Any]? {
    (run["metrics"] as? [[String: Any]])?.first { $0["name"] as? String == name }
}

func median(_ run: [String: Any], _ name: String) -> Double? {
    (metric(run, name)?["summary"] as? [String: Any])?["median"] as? Double
}

/// Polls until `condition` holds or `seconds` pass.
func waitFor(_ seconds: Double, _ condition: () -> Bool) -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if condition() { return true }
        usleep(20_000)
    }
    return condition()
}

/// Run directories (`memlab-run-*`) and other files memlab may leave in the temporary
/// directories: what a test expects to find empty after a run, a kill and the next start.
func memlabLitter() -> [String] {
    var out: [String] = []
    for base in ["/tmp", "/var/tmp", "/dev/shm"] {
        for name in (try? FileManager.default.contentsOfDirectory(atPath: base)) ?? []
        where name.hasPrefix("memlab-run-") || name.hasPrefix("memlab-ps-") || name.hasPrefix("memlab-pagesource-")
            || name.hasPrefix("memlab-lazy-") || name.hasPrefix("memlab.") || name.hasPrefix("memlab-child.") || name.hasPrefix("memlab-unsaved-") {
            out.append("\(base)/\(name)")
        }
    }
    return out.sorted()
}

/// A value one thread fills and another reads after a semaphore.
final class Box<T>: @unchecked Sendable {
    var value: T
    init(_ value: T) { self.value = value }
}
