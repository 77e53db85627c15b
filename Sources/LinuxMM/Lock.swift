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
    // @unchecked: `value` is read and written only inside `withLock`, under the mutex.
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

/// A counting POSIX semaphore with a deadline. `@unchecked Sendable`: the sem_t is only ever
/// touched through sem_* calls, which are thread-safe, and it is freed by this type alone.
public final class Semaphore: @unchecked Sendable {
    private let sem: UnsafeMutablePointer<sem_t>

    public init(_ value: UInt32 = 0) {
        sem = .allocate(capacity: 1)
        sem_init(sem, 0, value)
    }

    deinit {
        sem_destroy(sem)
        sem.deallocate()
    }

    public func post() { sem_post(sem) }

    /// Waits (EINTR retried).
    public func wait() { while sem_wait(sem) != 0 && errno == EINTR {} }

    /// Waits at most `seconds` (≤ a day; callers check); false when the time ran out.
    public func wait(seconds: Double) -> Bool {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        let s = seconds.isFinite ? min(max(seconds, 0), 86_400) : 86_400
        let whole = s.rounded(.down)
        ts.tv_sec += Int(whole)
        ts.tv_nsec += Int((s - whole) * 1e9)
        if ts.tv_nsec >= 1_000_000_000 { ts.tv_sec += 1; ts.tv_nsec -= 1_000_000_000 }
        while sem_timedwait(sem, &ts) != 0 {
            if errno == EINTR { continue }
            return false
        }
        return true
    }
}
