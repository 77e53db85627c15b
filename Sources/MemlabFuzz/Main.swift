#if canImport(Glibc)
import Glibc
#endif
import LabKit

/// `memlab-fuzz`: memlab's libFuzzer targets in one binary (docs/reliability.md, "Fuzzing").
///
///     memlab-fuzz --list                      name, max_len and summary of every target
///     memlab-fuzz TARGET [libFuzzer args]     fuzz (a build with -sanitize=fuzzer,address -DFUZZING)
///     memlab-fuzz TARGET FILE|DIR...          replay inputs through TARGET (a normal build)
///     memlab-fuzz --replay-all CORPUS         replay CORPUS/<target>/* for every target
///
/// TARGET may also come from MEMLAB_FUZZ_TARGET. In a fuzzing build the entry point is ours
/// (SwiftPM links executables with main = MemlabFuzz_main): it picks the target, then hands
/// the remaining arguments to libFuzzer through LLVMFuzzerRunDriver.
@main
enum FuzzMain {
    static func main() {
        var args = Array(CommandLine.arguments.dropFirst())
        if args.first == "--list" {
            for t in allTargets { print("\(t.name) \(t.maxLen) \(t.summary)") }
            exit(0)
        }
        if args.first == "--replay-all" {
            guard args.count == 2 else { usage("--replay-all takes one corpus directory") }
            exit(Replay.all(corpus: args[1]))
        }
        var name = getenv("MEMLAB_FUZZ_TARGET").map { String(cString: $0) }
        if let first = args.first, !first.hasPrefix("-"), allTargets.contains(where: { $0.name == first }) {
            name = first
            args.removeFirst()
        }
        guard let name, let target = allTargets.first(where: { $0.name == name }) else {
            usage("name a target: \(allTargets.map(\.name).joined(separator: ", "))")
        }
        // libFuzzer's -fork/-jobs children are started with the arguments it was given: the
        // target travels in the environment.
        setenv("MEMLAB_FUZZ_TARGET", name, 1)
        current = target
#if FUZZING
        var argv: [UnsafeMutablePointer<CChar>?] = [strdup(CommandLine.arguments[0])] + args.map { strdup($0) } + [nil]
        var argc = CInt(argv.count - 1)
        let status = argv.withUnsafeMutableBufferPointer { buf -> CInt in
            var p: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?> = buf.baseAddress!
            return LLVMFuzzerRunDriver(&argc, &p, fuzzOne)
        }
        exit(status)
#else
        guard !args.isEmpty else { usage("this build replays inputs: give files or directories (fuzzing needs a -DFUZZING build, see scripts/fuzz)") }
        exit(Replay.run(target, paths: args))
#endif
    }

    nonisolated(unsafe) static var current: FuzzTarget?

    static func usage(_ why: String) -> Never {
        writeStderr("memlab-fuzz: \(why)\nusage: memlab-fuzz --list | TARGET [libFuzzer args | FILE|DIR...] | --replay-all CORPUS\n")
        exit(2)
    }
}

/// One input, as libFuzzer hands it over.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    guard let t = FuzzMain.current ?? getenv("MEMLAB_FUZZ_TARGET").flatMap({ n in allTargets.first { $0.name == String(cString: n) } }) else {
        writeStderr("memlab-fuzz: no target (MEMLAB_FUZZ_TARGET)\n")
        exit(2)
    }
    _ = t.run(UnsafeRawBufferPointer(start: size > 0 ? data : nil, count: size))
    return 0
}

#if FUZZING
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(_ argc: UnsafeMutablePointer<CInt>,
                         _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>,
                         _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt) -> CInt
#endif
