#if canImport(Glibc)
import Glibc
#endif
import Foundation
import LabKit
import LinuxMM

/// What the host's memlab hands the memlab inside a guest, and what comes back, as files in
/// the job directory (shared read-write over 9p): `job.json` and `guest.env` from the host;
/// `host.json` (the guest's facts) and `run-I.json` (each run's result, written as it ends)
/// from the guest. Every file from the guest is bounded before it is read and decoded as
/// untrusted input: a guest can fail its own runs, never trap the host's memlab.
public struct GuestJob: Codable, Sendable {
    public struct Run: Codable, Sendable {
        public var scenario: String
        public var variant: String
        public var params: Params
        public var repetitions: Int
        public var warmup: Int
        public var placement: Placement
        public var sweep: SweepInfo?
    }

    public static let version = 1
    public var version = GuestJob.version
    public var runs: [Run]

    public init(_ requests: [RunRequest]) {
        runs = requests.map {
            Run(scenario: $0.scenario.id, variant: $0.variant, params: $0.params, repetitions: $0.repetitions,
                warmup: $0.warmup, placement: $0.placement, sweep: $0.sweep)
        }
    }

    public static let jobFile = "job.json"
    public static let envFile = "guest.env"
    public static let hostFile = "host.json"
    public static func runFile(_ i: Int) -> String { "run-\(i).json" }
    /// A run's result is metrics, series and notes: far below this.
    public static let maxRunBytes = 64 << 20
    public static let maxHostBytes = 1 << 20

    /// The requests again, on the guest's side; a scenario the guest's memlab does not know
    /// (it is the same binary, so never) fails that run.
    public func requests(registry: Registry) -> [Result<RunRequest, UsageError>] {
        runs.map { r in
            guard let s = registry.scenario(r.scenario) else { return .failure(UsageError("unknown scenario \(r.scenario)")) }
            guard (0...1000).contains(r.repetitions), (0...100).contains(r.warmup) else {
                return .failure(UsageError("repetitions or warmup out of range"))
            }
            var q = RunRequest(scenario: s, variant: r.variant, params: r.params, repetitions: r.repetitions, warmup: r.warmup, placement: r.placement)
            q.sweep = r.sweep
            return .success(q)
        }
    }

    /// A file of the job directory, at most `limit` bytes (nil if absent or larger, or not a
    /// regular file: a guest's link is not followed).
    public static func read(_ directory: String, _ name: String, limit: Int) -> Data? {
        let path = "\(directory)/\(name)"
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG, st.st_size >= 0, st.st_size <= limit else { return nil }
        var bytes = [UInt8](repeating: 0, count: Int(st.st_size))
        var got = 0
        while got < bytes.count {
            let n = bytes[got...].withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            got += n
        }
        return Data(bytes[0..<got])
    }

    /// `s` quoted for the guest's /bin/sh.
    static func shellQuoted(_ s: String) -> String { "'" + s.replacingOccurrences(of: "'", with: "'\\''") + "'" }
}
