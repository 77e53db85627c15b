#if canImport(Glibc)
import Glibc
#endif

/// Files written so that a reader (or a crash) sees the old content or the new, never half of
/// the new: a temporary file beside the target, written whole, fsync'd, renamed over the
/// target, and the directory fsync'd. A full disk or an I/O error leaves the old file as it
/// was and removes the temporary one.
public enum AtomicFile {
    public static func write(_ bytes: UnsafeRawBufferPointer, to path: String, mode: mode_t = 0o644) throws(SystemError) {
        var st = stat()
        if lstat(path, &st) == 0 {
            switch st.st_mode & S_IFMT {
            case S_IFLNK:
                // What the link names is written, never the link itself (-o /dev/stdout must
                // not turn that link into a file): a device or pipe through the link, a file
                // atomically where it really is, a link to nothing by creating its target.
                var t = stat()
                if stat(path, &t) == 0 {
                    let kind = t.st_mode & S_IFMT
                    if kind != S_IFREG && kind != S_IFDIR { return try writeThrough(bytes, to: path) }
                    guard let real = realpath(path, nil) else { throw SystemError.current("realpath", path: path) }
                    defer { free(real) }
                    return try write(bytes, to: String(cString: real), mode: mode)
                }
                return try write(bytes, to: try finalTarget(ofDanglingLink: path), mode: mode)
            case S_IFREG, S_IFDIR:
                break
            default:
                // A device or a FIFO (/dev/null, a terminal, a pipe): written through, never
                // replaced — renaming over /dev/null would replace it for the whole machine.
                return try writeThrough(bytes, to: path)
            }
        }
        let dir = directory(of: path)
        var template = Array("\(dir)/.\(basename(of: path)).memlab-XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        if fd < 0 { throw SystemError.current("mkstemp", path: "\(dir)/.\(basename(of: path)).memlab-XXXXXX") }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        let tmp = template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        var ok = false
        defer { if !ok { unlink(tmp) } }
        fchmod(fd, mode)
        var done = 0
        while done < bytes.count {
            let w = Glibc.write(fd, bytes.baseAddress! + done, bytes.count - done)
            if w < 0 {
                if errno == EINTR { continue }
                let e = SystemError.current("write", path: tmp)
                close(fd)
                throw e
            }
            done += w
        }
        // Delayed allocation: a full disk may show only here.
        if fsync(fd) != 0 { let e = SystemError.current("fsync", path: tmp); close(fd); throw e }
        if close(fd) != 0 { throw SystemError.current("close", path: tmp) }
        if rename(tmp, path) != 0 { throw SystemError.current("rename", path: path) }
        ok = true
        let dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dfd >= 0 { fsync(dfd); close(dfd) }
    }

    /// Where a chain of links that ends in nothing points (at most 40 links, as the kernel).
    static func finalTarget(ofDanglingLink path: String) throws(SystemError) -> String {
        var p = path
        for _ in 0..<40 {
            var buf = [CChar](repeating: 0, count: 4097)
            let n = readlink(p, &buf, 4096)
            if n < 0 { return p }
            let dest = String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
            p = dest.hasPrefix("/") ? dest : directory(of: p) + "/" + dest
            var st = stat()
            if lstat(p, &st) != 0 || (st.st_mode & S_IFMT) != S_IFLNK { return p }
        }
        throw SystemError(errno: ELOOP, call: "follow links", path: path)
    }

    static func writeThrough(_ bytes: UnsafeRawBufferPointer, to path: String) throws(SystemError) {
        let fd = open(path, O_WRONLY | O_CLOEXEC | O_NOCTTY)
        if fd < 0 { throw SystemError.current("open", path: path) }
        defer { close(fd) }
        var done = 0
        while done < bytes.count {
            let w = Glibc.write(fd, bytes.baseAddress! + done, bytes.count - done)
            if w < 0 { if errno == EINTR { continue }; throw SystemError.current("write", path: path) }
            done += w
        }
    }

    public static func write(_ bytes: [UInt8], to path: String, mode: mode_t = 0o644) throws(SystemError) {
        var failure: SystemError?
        bytes.withUnsafeBytes { b in
            do throws(SystemError) { try write(b, to: path, mode: mode) } catch { failure = error }
        }
        if let failure { throw failure }
    }

    /// Whether `path` could be written here now: it names no directory or device, its
    /// directory exists and takes a file, and the file system takes a byte (a probe file is
    /// written, fsync'd and removed: a full disk or a read-only mount shows here, not after
    /// an experiment ran). Creates nothing that stays.
    public static func probe(_ path: String) throws(SystemError) {
        if path.isEmpty { throw SystemError(errno: ENOENT, call: "an empty file name") }
        if path.hasSuffix("/") { throw SystemError(errno: EISDIR, call: "a file name ending in /", path: path) }
        var st = stat()
        if stat(path, &st) == 0 {
            if (st.st_mode & S_IFMT) == S_IFDIR { throw SystemError(errno: EISDIR, call: "a directory, not a file", path: path) }
            if (st.st_mode & S_IFMT) != S_IFREG { throw SystemError(errno: EINVAL, call: "not a regular file (a result is written beside it and renamed over it)", path: path) }
        }
        let one: [UInt8] = [0x0A]
        let dir = directory(of: path)
        let probe = "\(dir)/.\(basename(of: path)).memlab-probe"
        try write(one, to: probe)
        unlink(probe)
    }

    /// The directory part ("." for a bare name).
    public static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        let d = String(path[..<slash])
        return d.isEmpty ? "/" : d
    }

    /// The file name, cut to leave room for the temporary name's additions within NAME_MAX.
    public static func basename(of path: String) -> String {
        let name = path.lastIndex(of: "/").map { String(path[path.index(after: $0)...]) } ?? path
        return String(decoding: name.utf8.prefix(200), as: UTF8.self)
    }
}
