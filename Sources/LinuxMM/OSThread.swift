#if canImport(Glibc)
import Glibc
#endif

/// memlab's one way to start a thread: a dedicated pthread running `body` once. Fault
/// handlers, workloads, connection readers, samplers and the signal thread are OS threads,
/// never `Task`s — the cooperative pool has as many threads as CPUs (2 here), and a handler
/// blocked in read(2) there would stall everything else.
///
/// A thread is joined exactly once (`join`) or given up (`detach`); a started thread that
/// is dropped without either is detached by `deinit`, so its stack is never leaked.
public final class OSThread: Sendable {
    private final class Box: Sendable {
        let body: @Sendable () -> Void
        init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }

    /// The pthread; fixed at start.
    public let handle: pthread_t
    /// Set once by `join` or `detach`: a pthread may be joined or detached only once.
    private let released: Lock<Bool> = Lock(false)

    /// Starts the thread. `stackBytes`: a smaller stack than the default 8 MiB for threads
    /// started by the hundred (a page source's connections). Throws pthread_create's errno.
    public init(stackBytes: Int? = nil, body: @escaping @Sendable () -> Void) throws(SystemError) {
        var attr = pthread_attr_t()
        pthread_attr_init(&attr)
        defer { pthread_attr_destroy(&attr) }
        if let stackBytes { pthread_attr_setstacksize(&attr, max(stackBytes, Int(PTHREAD_STACK_MIN))) }
        let box = Unmanaged.passRetained(Box(body))
        var t = pthread_t()
        let rc = pthread_create(&t, &attr, { arg in
            let b = Unmanaged<Box>.fromOpaque(arg!).takeRetainedValue()
            b.body()
            return nil
        }, box.toOpaque())
        if rc != 0 {
            box.release()
            throw SystemError(errno: rc, call: "pthread_create")
        }
        handle = t
    }

    deinit { detach() }

    /// Waits for the thread to end (once; later calls return at once).
    public func join() {
        guard released.withLock({ r in defer { r = true }; return !r }) else { return }
        pthread_join(handle, nil)
    }

    /// Lets the thread run on unjoined (its resources go back when it ends).
    public func detach() {
        guard released.withLock({ r in defer { r = true }; return !r }) else { return }
        pthread_detach(handle)
    }
}
