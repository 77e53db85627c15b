#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A failed system call, with the errno it set and what was being done (the call, and the
/// path or object where there is one) — so a message can say exactly what failed.
public struct SystemError: Error, CustomStringConvertible, Sendable, Equatable {
    public let errno: Int32
    public let call: String
    public let path: String?

    public init(errno: Int32, call: String, path: String? = nil) {
        self.errno = errno
        self.call = call
        self.path = path
    }

    /// Captures the calling thread's current errno.
    public static func current(_ call: String, path: String? = nil) -> SystemError {
        SystemError(errno: Glibc.errno, call: call, path: path)
    }

    public var errnoName: String { SystemError.name(of: errno) }

    public var description: String {
        // errno 0: no call failed, the kernel answered otherwise than asked; `call` says how.
        if errno == 0 { return path.map { "\(call) (\($0))" } ?? call }
        let message = String(cString: strerror(errno))
        if let path { return "\(call) \(path): \(message) (\(errnoName))" }
        return "\(call): \(message) (\(errnoName))"
    }

    static func name(of code: Int32) -> String {
        switch code {
        case EPERM: return "EPERM"
        case ENOENT: return "ENOENT"
        case EINTR: return "EINTR"
        case EIO: return "EIO"
        case EBADF: return "EBADF"
        case EAGAIN: return "EAGAIN"
        case ENOMEM: return "ENOMEM"
        case EACCES: return "EACCES"
        case EFAULT: return "EFAULT"
        case EBUSY: return "EBUSY"
        case EEXIST: return "EEXIST"
        case EINVAL: return "EINVAL"
        case ENOSPC: return "ENOSPC"
        case ENOSYS: return "ENOSYS"
        case EROFS: return "EROFS"
        case EOPNOTSUPP: return "EOPNOTSUPP"
        case ESRCH: return "ESRCH"
        case ENOTTY: return "ENOTTY"
        default: return "errno \(code)"
        }
    }
}

/// Retries a call while it fails with EINTR; throws SystemError for any other failure.
@inline(__always)
func retryingOnInterrupt<T: BinaryInteger>(_ call: String, path: String? = nil, _ body: () -> T) throws(SystemError) -> T {
    while true {
        let rc = body()
        if rc >= 0 { return rc }
        if Glibc.errno == EINTR { continue }
        throw SystemError.current(call, path: path)
    }
}
