#if canImport(Glibc)
import Glibc
#endif
import Foundation
import LinuxMM

/// Where memlab's outputs go (result documents, CSV, reports), so that a result is never lost:
/// paths are probed before an experiment runs, files are written atomically (a full disk
/// leaves the old file as it was), and when the write fails after all the document is saved to
/// a fallback path that is printed.
public enum ResultOutput {
    /// Fails (exit 2) before anything runs when `path` could not be written later: an empty
    /// name, a directory, a device, a read-only or full file system. Creates missing parent
    /// directories, as the write would.
    /// `acceptDevice`: a device or FIFO is fine (written through, e.g. `report -o /dev/stdout`);
    /// without it — a run's result document — it is refused, since the document would be lost.
    public static func check(_ path: String, what: String, acceptDevice: Bool = false) throws(UsageError) {
        if path.isEmpty { throw UsageError("\(what): an empty file name") }
        if path.hasSuffix("/") { throw UsageError("\(what) '\(path)' names a directory; name a file") }
        var st = stat()
        var target = path
        if stat(path, &st) == 0 {
            if (st.st_mode & S_IFMT) == S_IFDIR { throw UsageError("\(what) '\(path)' is a directory; name a file") }
            if (st.st_mode & S_IFMT) != S_IFREG {
                if acceptDevice { return }
                throw UsageError("\(what) '\(path)' is not a regular file (a result goes to a file, written beside it and renamed over it)")
            }
            // Through a link, the probe goes where the file really is.
            if let real = realpath(path, nil) { target = String(cString: real); free(real) }
        }
        do {
            try makeParents(of: target)
            try AtomicFile.probe(target)
        } catch {
            throw UsageError("\(what) '\(path)' cannot be written: \(error)")
        }
    }

    public struct Saved: Sendable {
        /// Where the data is now.
        public let path: String
        /// Why it is not at the path asked for (nil: it is).
        public let failure: String?
    }

    /// Writes `data` to `path` atomically; if that fails, to the first fallback directory that
    /// takes it. Returns where it went. nil only when no place at all took it.
    public static func save(_ data: Data, to path: String, stateDirectory: String = SettingsGuard.defaultStateDirectory) -> Saved? {
        let bytes = [UInt8](data)
        let failure: String
        do {
            try makeParents(of: path)
            try AtomicFile.write(bytes, to: path)
            return Saved(path: path, failure: nil)
        } catch {
            failure = error.description
        }
        let name = (path as NSString).lastPathComponent
        let unique = "memlab-unsaved-\(getpid())-\(Clock.nanoseconds())-\(name.isEmpty ? "result" : name)"
        for dir in ["\(stateDirectory)/unsaved", "/var/tmp", "/tmp", "/dev/shm"] {
            let candidate = "\(dir)/\(unique)"
            do {
                try makeParents(of: candidate)
                try AtomicFile.write(bytes, to: candidate, mode: 0o600)
                return Saved(path: candidate, failure: failure)
            } catch { continue }
        }
        return nil
    }

    /// Writes `data` to `path`; on failure saves it to a fallback, says where on stderr, and
    /// throws an error naming both (the caller exits 1: the user must notice). When nothing
    /// takes it, the data goes to standard output as a last resort.
    /// Held while an output is written: the signal path takes it before it exits, so a
    /// Ctrl-C during the write waits for the write to end (no half-written temporary file,
    /// no document lost after every run finished).
    public static let gate = Lock<Int>(0)

    public static func write(_ data: Data, to path: String, what: String) throws(OutputError) {
        try gate.withLock { (_) throws(OutputError) in try writeUngated(data, to: path, what: what) }
    }

    static func writeUngated(_ data: Data, to path: String, what: String) throws(OutputError) {
        guard let saved = save(data, to: path) else {
            writeStderr("memlab: could not write \(what) to \(path) nor to any fallback directory; here it is on standard output:\n")
            FileHandle.standardOutput.write(data)
            throw OutputError(message: "could not write \(what) to \(path); it was printed on standard output")
        }
        if let failure = saved.failure {
            let msg = "could not write \(what) to \(path) (\(failure)); it is saved at \(saved.path)"
            writeStderr("memlab: \(msg)\n")
            throw OutputError(message: msg)
        }
    }

    static func makeParents(of path: String) throws(SystemError) {
        let dir = AtomicFile.directory(of: path)
        var at = dir.hasPrefix("/") ? "" : "."
        for part in dir.split(separator: "/") {
            at += "/" + part
            if mkdir(at, 0o755) != 0 && errno != EEXIST { throw SystemError.current("mkdir", path: at) }
        }
    }
}

/// An output that could not be written where asked (it was saved elsewhere, or printed).
public struct OutputError: Error, CustomStringConvertible, Sendable {
    public let message: String
    public var description: String { message }
}
