#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing

/// The fuzz targets' seed corpora and stored findings, replayed through the real decoders by
/// `memlab-fuzz` built without libFuzzer (the replay driver): every file of
/// Fuzz/corpus/<target>/ through its target, `ok-*` accepted, `bad-*` refused, nothing traps.
@Suite struct FuzzCorpus {
    static let repo = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
    /// The replay driver beside the test bundle (built with the tests; MEMLAB_BIN may name a
    /// release memlab elsewhere, built without it).
    static var fuzzBinary: String {
        var buf = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buf, buf.count - 1)
        let exe = String(decoding: buf[0..<max(n, 0)].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return (exe as NSString).deletingLastPathComponent + "/memlab-fuzz"
    }

    static func run(_ args: [String]) throws -> (Int32, String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: fuzzBinary)
        p.arguments = args
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        try p.run()
        let d = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: d, as: UTF8.self))
    }

    /// Every target `memlab-fuzz --list` names has seeds, and each replays as its name says.
    @Test func everySeedReplaysThroughItsTarget() throws {
        let (lrc, list) = try Self.run(["--list"])
        #expect(lrc == 0)
        let targets = list.split(separator: "\n").map { String($0.split(separator: " ")[0]) }
        #expect(targets.contains("migration") && targets.contains("pagewire") && targets.contains("snapshot"), "\(list)")
        let (rc, out) = try Self.run(["--replay-all", "\(Self.repo)/Fuzz/corpus"])
        #expect(rc == 0, "\(out)")
        for t in targets {
            let line = out.split(separator: "\n").first { $0.hasPrefix("\(t): ") } ?? ""
            let n = Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0
            #expect(n > 0, "\(t) replayed no input: \(out)")
            #expect(line.contains(" accepted") && !line.contains(" 0 accepted"), "\(t): no valid seed was accepted: \(line)")
        }
    }

    /// The replay notices a decoder that turns against its seeds: a valid HELLO stream named
    /// bad-* (expected refused) fails the run, as a valid one refused would.
    @Test func replayFailsWhenASeedIsJudgedOtherwise() throws {
        let dir = TempDir()
        let ok = try Data(contentsOf: URL(fileURLWithPath: "\(Self.repo)/Fuzz/corpus/migration/ok-dest-one-round-and-stop-copy"))
        try ok.write(to: URL(fileURLWithPath: dir.file("bad-actually-valid")))
        let (rc, out) = try Self.run(["migration", dir.path])
        #expect(rc == 1, "\(out)")
        #expect(out.contains("bad-actually-valid: expected refused, was accepted"), "\(out)")
    }
}
