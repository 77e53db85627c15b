/// One libFuzzer target: a name (`memlab-fuzz NAME`), the longest input worth trying, and the
/// code under test run on one input.
///
/// `run` must never trap on any input — that is what the fuzzer looks for. It may stop the
/// process on purpose (`fuzzInvariant`) when the code under test broke one of its own
/// promises. It returns whether the input was *accepted* (a valid message, a parsed file):
/// the replay driver checks that corpus files named `ok-*` are accepted and `bad-*` refused.
struct FuzzTarget: Sendable {
    let name: String
    let maxLen: Int
    let summary: String
    let run: @Sendable (UnsafeRawBufferPointer) -> Bool
}

/// Every target. To add one: a file in Targets/ with `extension FuzzTarget { static let x = … }`,
/// its name here, and seeds in Fuzz/corpus/<name>/ (scripts/fuzz and the corpus test pick it
/// up from `memlab-fuzz --list`).
let allTargets: [FuzzTarget] = [
    .migration,
    .pagewire,
    .pagesource,
    .snapshot,
    .scenarioPlan,
    .report,
    .qmp,
    .agent,
    .uffdhandler,
    .guestrun,
    .kernelText,
]

/// A promise of the code under test that an input broke: a finding, reported like a crash.
func fuzzInvariant(_ ok: @autoclosure () -> Bool, _ what: @autoclosure () -> String) {
    if !ok() { fatalError("invariant broken: \(what())") }
}

/// Reads little-endian integers off the front of a fuzz input; past the end, zeros.
struct FuzzBytes {
    let b: UnsafeRawBufferPointer
    var at = 0
    init(_ b: UnsafeRawBufferPointer) { self.b = b }
    var remaining: Int { b.count - at }
    mutating func u8() -> UInt8 { guard at < b.count else { return 0 }; defer { at += 1 }; return b[at] }
    mutating func u32() -> UInt32 { var v: UInt32 = 0; for i in 0..<4 { v |= UInt32(u8()) << (8 * i) }; return v }
    mutating func u64() -> UInt64 { var v: UInt64 = 0; for i in 0..<8 { v |= UInt64(u8()) << (8 * i) }; return v }
    mutating func rest() -> UnsafeRawBufferPointer {
        defer { at = b.count }
        return at < b.count ? UnsafeRawBufferPointer(rebasing: b[at...]) : UnsafeRawBufferPointer(start: nil, count: 0)
    }
    /// The next `n` bytes, or nil when fewer are left.
    mutating func take(_ n: Int) -> UnsafeRawBufferPointer? {
        guard n >= 0, b.count - at >= n else { return nil }
        defer { at += n }
        return UnsafeRawBufferPointer(rebasing: b[at..<(at + n)])
    }
}
