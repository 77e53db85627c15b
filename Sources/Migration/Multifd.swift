#if canImport(Glibc)
import Glibc
#endif
import LinuxMM
import Synchronization
import Transfer

/// Multifd (QEMU's multiple page channels): N extra TCP connections carry page data beside
/// the control connection, each with its own sender thread and, at the destination, its own
/// receiver thread, so copying, encoding and the kernel's socket work spread over CPUs.
///
/// The protocol (docs/migration-protocol.md): after WELCOME the source sends CHANNELS(n,
/// token) on the control connection and opens n connections, each starting with
/// CHANNEL_HELLO(token, index, n); the destination answers CHANNELS_READY once all are in.
/// A page always travels on channel `index mod n` (so a channel's XBZRLE cache and the
/// destination's copy of its pages stay one history). Before each ROUND_END and FINISH, every
/// channel sends CHANNEL_SYNC(sequence, pages since the last sync, last); the destination
/// takes the control message only when every channel's sync is in, and the pages they count
/// must add up to what the control message says.
public enum Multifd {
    public static let maxChannels = 16

    /// CHANNEL_SYNC's payload.
    static func syncPayload(sequence: UInt32, pages: UInt32, last: Bool) -> [UInt8] {
        var w = PayloadWriter()
        w.u32(sequence); w.u32(pages); w.u32(last ? 1 : 0)
        return w.bytes
    }
}

/// The source's side of one channel: a thread that encodes and sends the pages it is given.
final class ChannelSender: @unchecked Sendable {
    // @unchecked: `job`, `failure` and `pagesSinceSync` are handed over through the two
    // semaphores (the owner writes the job, posts `work`, waits `done`, then reads).
    let index: Int
    let connection: WireConnection
    let encoder: PageEncoder?
    let pageSize: Int
    private let buffer: UnsafeMutableRawPointer
    private let work = Semaphore()
    private let done = Semaphore()
    private var thread: OSThread?
    private let stopping = Atomic<Bool>(false)
    var job: [Int] = []
    var source: UnsafeRawPointer?
    var failure: WireError?
    var pagesSinceSync = 0

    init(index: Int, connection: WireConnection, encoding: EncodingConfig, pageSize: Int) throws(WireError) {
        self.index = index
        self.connection = connection
        self.pageSize = pageSize
        encoder = encoding.isRaw ? nil : PageEncoder(config: encoding, pageSize: pageSize)
        buffer = .allocate(byteCount: PageEncoder.frameCapacity(pages: Wire.pagesPerFrame, pageSize: pageSize), alignment: 64)
        do throws(SystemError) {
            thread = try OSThread { [self] in self.loop() }
        } catch {
            buffer.deallocate()
            throw .system(SystemError(errno: error.errno, call: "pthread_create (multifd channel \(index))"))
        }
    }

    private func loop() {
        while true {
            work.wait()
            if stopping.load(ordering: .acquiring) { return }
            do throws(WireError) {
                if let src = source { try sendPages(src) }
            } catch { failure = error }
            done.post()
        }
    }

    private func sendPages(_ source: UnsafeRawPointer) throws(WireError) {
        var i = 0
        while i < job.count {
            let n = min(Wire.pagesPerFrame, job.count - i)
            let slice = job[i..<(i + n)]
            if let encoder {
                let len = encoder.encodeFrame(slice, from: source, into: buffer)
                try connection.send(.encodedPages, buffer, len)
            } else {
                buffer.storeBytes(of: UInt32(n).littleEndian, as: UInt32.self)
                for (k, p) in slice.enumerated() { (buffer + 4 + 8 * k).storeBytes(of: UInt64(p).littleEndian, as: UInt64.self) }
                let data = buffer + 4 + 8 * n
                for (k, p) in slice.enumerated() { memcpy(data + k * pageSize, source + p * pageSize, pageSize) }
                try connection.send(.pages, buffer, 4 + n * (8 + pageSize))
            }
            pagesSinceSync += n
            i += n
        }
    }

    func start(_ pages: [Int], from source: UnsafeRawPointer) {
        job = pages
        self.source = source
        failure = nil
        work.post()
    }

    func wait() throws(WireError) {
        done.wait()
        if let f = failure { throw f }
    }

    func sync(sequence: UInt32, last: Bool) throws(WireError) {
        try connection.send(.channelSync, Multifd.syncPayload(sequence: sequence, pages: UInt32(clamping: pagesSinceSync), last: last))
        pagesSinceSync = 0
    }

    func close() {
        if stopping.exchange(true, ordering: .acquiringAndReleasing) { return }
        work.post()
        thread?.join()
        connection.close()
        buffer.deallocate()
    }
}

/// The destination's side of one channel: a thread that takes page frames into the region
/// until the last sync, and hands each sync to the control thread.
final class ChannelReceiver: @unchecked Sendable {
    // @unchecked: the sync results go through `syncs` (a lock) and the `arrived` semaphore.
    let index: Int
    let connection: WireConnection
    private var sink: PageSink
    private let region: UnsafeMutableRawPointer
    private let syncs = Lock<[(sequence: UInt32, pages: Int, last: Bool)]>([])
    private let failure = Lock<WireError?>(nil)
    private let arrived = Semaphore()
    private var thread: OSThread?
    private let counted = Atomic<Int>(0)
    private let bytes = Atomic<Int>(0)

    init(index: Int, connection: WireConnection, pageSize: Int, pageCount: Int, region: UnsafeMutableRawPointer) throws(WireError) {
        self.index = index
        self.connection = connection
        self.region = region
        sink = PageSink(pageSize: pageSize, pageCount: pageCount)
        do throws(SystemError) {
            thread = try OSThread { [self] in self.loop() }
        } catch {
            throw .system(SystemError(errno: error.errno, call: "pthread_create (multifd receiver \(index))"))
        }
    }

    var bytesReceived: Int { bytes.load(ordering: .relaxed) }
    var decodeCPU: Double { sink.decoder?.decodeCPU ?? 0 }

    private func loop() {
        var sinceSync = 0
        while true {
            do throws(WireError) {
                let f = try connection.receive(waitingFor: "pages or CHANNEL_SYNC on multifd channel \(index)")
                switch f.type {
                case .pages, .encodedPages:
                    let n = try sink.take(f, region: region)
                    sinceSync += n
                    bytes.add(f.payload.count + FrameHeader.size, ordering: .relaxed)
                    // A channel cannot carry more pages between two syncs than the region has.
                    if sinceSync > sink.pageCount { throw .malformed("multifd channel \(index): \(sinceSync) pages since its last sync, the region has \(sink.pageCount)") }
                case .channelSync:
                    var r = PayloadReader(f)
                    let seq = try r.u32(), pages = try r.u32(), last = try r.u32()
                    try r.end()
                    guard last <= 1 else { throw .malformed("CHANNEL_SYNC with last = \(last)") }
                    if UInt64(pages) != UInt64(sinceSync) {
                        throw .mismatch("multifd channel \(index) says \(pages) pages since its last sync, \(sinceSync) arrived on it")
                    }
                    syncs.withLock { $0.append((seq, sinceSync, last == 1)) }
                    sinceSync = 0
                    arrived.post()
                    if last == 1 { return }
                default:
                    throw .malformed("unexpected \(f.type) on multifd channel \(index)")
                }
            } catch {
                failure.withLock { $0 = error }
                arrived.post()
                return
            }
        }
    }

    /// The next sync, in order; it must carry `sequence`.
    func nextSync(_ sequence: UInt32, timeoutS: Double) throws(WireError) -> (pages: Int, last: Bool) {
        guard arrived.wait(seconds: timeoutS) else { throw .timeout("multifd channel \(index) sent no CHANNEL_SYNC \(sequence) within \(timeoutS) s") }
        if let f = failure.withLock({ $0 }) { arrived.post(); throw f }
        let s = syncs.withLock { $0.removeFirst() }
        guard s.sequence == sequence else {
            throw .mismatch("multifd channel \(index) sent CHANNEL_SYNC \(s.sequence); the control stream is at \(sequence)")
        }
        return (s.pages, s.last)
    }

    func close() {
        connection.close()
        thread?.join()
    }
}
