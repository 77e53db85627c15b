#if canImport(Glibc)
import Glibc
#endif

/// A value guarded by a pthread mutex: memlab's lock, used wherever threads share state.
///
/// Why not the standard library's `Synchronization.Mutex`: on Linux it is a futex word whose
/// unlock ThreadSanitizer does not see, so every access made under it was reported as a data
/// race (scripts/sanitize), drowning any real one. ThreadSanitizer intercepts pthread mutexes.
/// Uncontended, a pthread mutex costs one atomic exchange each way, as the futex does.
public final class Lock<Value>: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private var value: Value

    public init(_ value: Value) {
        self.value = value
        mutex = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    @inline(__always)
    public func withLock<R, E: Error>(_ body: (inout Value) throws(E) -> R) throws(E) -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value)
    }
}
