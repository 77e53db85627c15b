#if canImport(Glibc)
import Glibc
#endif
import LabKit
import LinuxMM

/// The replay driver: every corpus file through its target, in a normal build (a regression
/// test of each seed and each stored finding). A file named `ok-*` must be accepted, `bad-*`
/// refused; a trap is a failure of the whole run, as under the fuzzer.
enum Replay {
    static func run(_ target: FuzzTarget, paths: [String]) -> Int32 {
        var inputs = 0, accepted = 0, wrong: [String] = []
        for path in paths {
            for file in files(path) {
                guard let data = read(file) else { writeStderr("memlab-fuzz: cannot read \(file)\n"); return 1 }
                let ok = data.withUnsafeBytes { target.run($0) }
                inputs += 1
                if ok { accepted += 1 }
                let base = file.split(separator: "/").last.map(String.init) ?? file
                if base.hasPrefix("ok-") && !ok { wrong.append("\(file): expected accepted, was refused") }
                if base.hasPrefix("bad-") && ok { wrong.append("\(file): expected refused, was accepted") }
            }
        }
        print("\(target.name): \(inputs) inputs replayed, \(accepted) accepted, \(inputs - accepted) refused")
        for w in wrong { print("  \(w)") }
        return wrong.isEmpty ? 0 : 1
    }

    /// CORPUS/<target>/ for every target; a target without seeds, or seeds without a target,
    /// is an error (a corpus that silently replays nothing tests nothing).
    static func all(corpus: String) -> Int32 {
        var status: Int32 = 0
        let dirs = Set(entries(corpus).filter { isDirectory("\(corpus)/\($0)") })
        for t in allTargets {
            guard dirs.contains(t.name), !files("\(corpus)/\(t.name)").isEmpty else {
                print("\(t.name): no seeds in \(corpus)/\(t.name)"); status = 1; continue
            }
            if run(t, paths: ["\(corpus)/\(t.name)"]) != 0 { status = 1 }
        }
        for d in dirs.sorted() where !allTargets.contains(where: { $0.name == d }) {
            print("\(corpus)/\(d): no target of that name"); status = 1
        }
        return status
    }

    static func isDirectory(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
    }

    /// Through ProcFile.list, which reads each name where readdir put it (copying a dirent
    /// whole reads past the end of readdir's buffer).
    static func entries(_ dir: String) -> [String] {
        ProcFile.list(dir).filter { !$0.hasPrefix(".") }
    }

    static func files(_ path: String) -> [String] {
        isDirectory(path) ? entries(path).map { "\(path)/\($0)" }.filter { !isDirectory($0) } : [path]
    }

    static func read(_ path: String) -> [UInt8]? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        if fd < 0 { return nil }
        defer { close(fd) }
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buf.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n < 0 { if errno == EINTR { continue }; return nil }
            if n == 0 { return out }
            out += buf[0..<n]
        }
    }
}
