#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import Histogram
import LabKit
import LinuxMM
import Transfer

/// Lazy restore / post-copy over userfaultfd: the destination is this (child) process, whose
/// region is registered with userfaultfd and filled on demand by memlab's fault engine; only
/// the source and the link are modelled (an in-memory image, an emulated link with real
/// waits). Each policy moves the same pages for the same workload, so a sweep over `policy`
/// is a side-by-side table.
public struct LazyRestoreScenario: TypedScenario {
    public init() {}
    public let id = "lazy-restore"
    public let summary = "Post-copy / lazy restore on userfaultfd: fault engine, emulated link, prefetch policies"

    public enum Variant: String, ScenarioVariant {
        case restore, floors
        public var summary: String {
            switch self {
            case .restore: return "restore a region lazily under a workload with one policy; faults, latency, bytes, slowdown; contents verified"
            case .floors: return "this machine's floors: first-touch fault, UFFDIO_COPY per page and bulk, local fault round trip per wait mode, loopback TCP RTT"
            }
        }
    }

    static let policies = EngineConfig.Policy.allCases.map(\.rawValue)

    public enum LinkKind: String, CaseIterable, ParameterChoice { case emulated, none, netem }
    public enum Queue: String, CaseIterable, ParameterChoice { case fifo, preempt }
    public enum RegionKind: String, CaseIterable, ParameterChoice { case anon, memfd, hugetlb }
    public enum HandlerKind: String, CaseIterable, ParameterChoice { case inProcess = "in-process", external }
    public enum PushUntil: String, CaseIterable, ParameterChoice { case workload, resident }
    public enum ZeroPages: String, CaseIterable, ParameterChoice { case zeropage, transfer }
    public enum ReplayMode: String, CaseIterable, ParameterChoice { case before, concurrent }
    public enum SourceKind: String, CaseIterable, ParameterChoice { case memory, unix, tcp, file }
    public enum SourceDirectory: String, CaseIterable, ParameterChoice { case varTmp = "/var/tmp", tmp = "/tmp", devShm = "/dev/shm" }
    public enum FileCache: String, CaseIterable, ParameterChoice { case drop, keep }
    public enum FloorsChoice: String, CaseIterable, ParameterChoice { case measure, off }

    public struct Parameters: ParameterSet {
        public init() {}
        let size = Parameter<Int>("size", (1 << 20)...(16 << 30), default: 64 << 20, unit: .bytes, help: "bytes of the restored region")
        let policy = Parameter<EngineConfig.Policy>("policy", default: .onDemand, help: "which pages move when: " + LazyRestoreScenario.policies.joined(separator: ", "))
        let workload = Parameter<AccessTraces.Pattern>("workload", default: .sequential, help: "access pattern of the workload threads; trace: replay trace_file")
        let traceFile = Parameter<String>("trace_file", text: "", help: "workload=trace: a recorded access trace, one access per line: <page index> or @<byte offset>, optionally r|w; '#' comments; line i runs on thread i mod threads (accesses is ignored)")
        let recordTrace = Parameter<String>("record_trace", text: "", help: "write the access order this run's workload uses to this path (the same format; replay it with workload=trace)")
        let zipfSkew = Parameter<Double>("zipf_skew", 0.01...5, default: 0.99, unit: .none, help: "zipf: exponent of the hot-set distribution")
        let accesses = Parameter<Int>("accesses", 1...100_000_000, default: 1024, unit: .count, help: "accesses per workload thread (one word of one page each)")
        let writeRatio = Parameter<Double>("write_ratio", 0...1, default: 0.2, unit: .ratio, help: "fraction of accesses that write")
        let threads = Parameter<Int>("threads", 1...64, default: 1, unit: .count, help: "workload threads")
        let link = Parameter<LinkKind>("link", default: .emulated, help: "emulated: bandwidth and RTT below; none: install at once (the local floor); netem: a real link, the run's own network namespace with netem on its loopback (bandwidth and RTT below; needs source=tcp and a kernel with sch_netem)")
        let bandwidthMbit = Parameter<Double>("bandwidth_mbit", 1...1_000_000, default: 1000, unit: .mbitPerSecond, help: "emulated link bandwidth, Mbit/s")
        let rttMs = Parameter<Double>("rtt_ms", 0...1000, default: 1, unit: .ms, help: "emulated round-trip time, ms (urgent requests pay it in full)")
        let queue = Parameter<Queue>("queue", default: .fifo, help: "fifo: urgent pages queue behind pushed bulk; preempt: urgent pre-empts bulk")
        let wait = Parameter<EngineConfig.WaitMode>("wait", default: .blocking, help: "how handler threads wait for faults: blocking read, ppoll, epoll_wait (one epoll instance per handler thread), busy polling")
        let handlerThreads = Parameter<Int>("handler_threads", 1...16, default: 1, unit: .count, help: "fault handler threads")
        let batch = Parameter<Int>("batch", 1...64, default: 64, unit: .count, help: "messages read per read(2)")
        let region = Parameter<RegionKind>("region", default: .anon, help: "resolve=copy: the destination region is anonymous memory, or a memfd (shmem, MAP_SHARED) registered in MISSING mode and filled by UFFDIO_COPY / UFFDIO_ZEROPAGE into the page cache; hugetlb: 2 MiB hugetlbfs pages (policy=huge; resolve=copy: MAP_HUGETLB in MISSING mode, UFFDIO_COPY of 2 MiB; resolve=continue: an MFD_HUGETLB memfd whose page cache is filled first, MINOR faults, UFFDIO_CONTINUE), the pool borrowed for the run")
        let handler = Parameter<HandlerKind>("handler", default: .inProcess, help: "in-process: the fault engine's threads in the restoring process; external: the restoring process passes its userfaultfd and a memfd of the image over a Unix socket (SCM_RIGHTS) to a separate handler process (memlab _uffdhandler, as CRIU lazy-pages / Firecracker), which resolves faults with UFFDIO_COPY into it; on-demand, link=none, source=memory, resolve=copy; the hop is measured against the in-process handler in the same repetition")
        let killHandlerAfterS = Parameter<Double>("kill_handler_after_s", 0...3600, default: 0, unit: .s, help: "testing: SIGKILL the external handler process this long after resume (0: never; handler=external)")
        let pushUntil = Parameter<PushUntil>("push_until", default: .workload, help: "a pushing policy (background-push, bubble, criu-push): workload: the push stops when the workload is done; resident: the restore goes on until every page is in (time_to_full_restore always measured)")
        let resolve = Parameter<EngineConfig.Resolve>("resolve", default: .copy, help: "copy: UFFDIO_COPY (anon, MISSING); move: UFFDIO_MOVE from a staging copy; continue: memfd, MINOR faults, UFFDIO_CONTINUE")
        let zeroRatio = Parameter<Double>("zero_ratio", 0...1, default: 0.1, unit: .ratio, help: "fraction of image pages that are zero")
        let zeroPages = Parameter<ZeroPages>("zero_pages", default: .zeropage, help: "known-zero pages: UFFDIO_ZEROPAGE locally, or transferred like any page")
        let windowPages = Parameter<Int>("window_pages", 1...4096, default: 16, unit: .pages, help: "fault-around: pages sent per fault")
        let maxWindowPages = Parameter<Int>("max_window_pages", 1...4096, default: 512, unit: .pages, help: "fault-around-adaptive: largest window")
        let pushChunk = Parameter<Int>("push_chunk", 4096...(16 << 20), default: 64 << 10, unit: .bytes, help: "background push: bytes per transfer")
        let pushWindow = Parameter<Int>("push_window", 4096...(1 << 30), default: 1 << 20, unit: .bytes, help: "background push: bytes booked on the link ahead of now (a socket buffer)")
        let replayMode = Parameter<ReplayMode>("replay_mode", default: .before, help: "working-set-replay: install the recorded set before resuming (REAP) or push it concurrently (FaaSnap)")
        let sourceDeadlineS = Parameter<Double>("source_deadline_s", 0.1...3600, default: 30, unit: .s, help: "a restore not done by then is failed and the workload released")
        let injectSourceFailureS = Parameter<Double>("inject_source_failure_s", 0...3600, default: 0, unit: .s, help: "testing: declare the source dead this long after resume (0: never)")
        let source = Parameter<SourceKind>("source", default: .memory, help: "where pages come from: memory (in this process), unix / tcp (a separate source process, memlab _pagesource), file (a snapshot file read with pread); the emulated link's delays apply on top: arrival = max(real arrival, model)")
        let sourcePort = Parameter<Int>("source_port", 0...65535, default: 0, unit: .none, help: "source=tcp: port the source process listens on at 127.0.0.1 (0: any free port)")
        let sourceAddress = Parameter<String>("source_address", text: "", help: "source=tcp: IPv4:PORT of a page source already serving there (`memlab pagesource`, on this or another host) instead of a source process of our own; it must serve the same size, seed and zero_ratio, and every repetition restores that one image")
        let sourceDir = Parameter<SourceDirectory>("source_dir", default: .varTmp, help: "source=file: directory of the snapshot file (and of the source process's log)")
        let fileCache = Parameter<FileCache>("file_cache", default: .drop, help: "source=file: evict the snapshot from the page cache before the restore (reads from disk), or keep it")
        let killSourceAfterS = Parameter<Double>("kill_source_after_s", 0...3600, default: 0, unit: .s, help: "testing: SIGKILL the source process this long after resume (0: never; source=unix or tcp)")
        let dropEvery = Parameter<Int>("drop_every", 0...100_000_000, default: 0, unit: .count, help: "testing the REMOVE path: the last workload thread drops (MADV_DONTNEED) the page of every Nth access right after it (0: never)")
        let remapAfter = Parameter<Int>("remap_after", 0...100_000_000, default: 0, unit: .count, help: "testing REMAP: after this many accesses the (single) workload thread moves the whole region with mremap and goes on there; the engine follows the REMAP event (0: never)")
        let forkAfter = Parameter<Int>("fork_after", 0...100_000_000, default: 0, unit: .count, help: "testing FORK: after this many accesses the (single) workload thread forks a child that compares every 7th page with the source; a fork server answers the child's faults (0: never)")
        let floors = Parameter<FloorsChoice>("floors", default: .measure, help: "measure: a reduced calibration (< 0.3 s) in each repetition, recorded as floor_* metrics; off: skip it")
        let seed = Parameter<Int>("seed", 0...Int(Int32.max), default: 1, unit: .none, help: "seed of image contents and traces")
    }

    public func probe(_ variant: Variant) -> Availability {
        let p = Userfaultfd.probe()
        return p.usable ? .usable : .unusable(p.reason ?? "userfaultfd unusable")
    }

    public func probe(_ variant: Variant, _ params: Values) -> Availability {
        if case .unusable(let r) = probe(variant) { return .unusable(r) }
        let f = Userfaultfd.Features(rawValue: Userfaultfd.probe().features)
        if params.resolve == .move && !f.contains(.move) { return .unusable("UFFDIO_MOVE needs Linux 6.8+ (UFFD_FEATURE_MOVE)") }
        if params.resolve == .continue && !f.contains(.minorShmem) { return .unusable("MINOR faults on shmem need Linux 5.14+ (UFFD_FEATURE_MINOR_SHMEM)") }
        if params.region == .memfd && !f.contains(.missingShmem) { return .unusable("MISSING faults on shmem need Linux 4.11+ (UFFD_FEATURE_MISSING_SHMEM)") }
        if params.link == .netem, let why = NetemLoopback.missing { return .unusable("link=netem: \(why)") }
        if params.region == .hugetlb {
            if HugeTLB.pool(pageBytes: 2 << 20) == nil { return .unusable("no 2 MiB hugetlb pool on this kernel (CONFIG_HUGETLBFS)") }
            if params.resolve == .continue && !f.contains(.minorHugetlbfs) { return .unusable("MINOR faults on hugetlbfs need Linux 5.13+ (UFFD_FEATURE_MINOR_HUGETLBFS)") }
            if params.resolve == .copy && !f.contains(.missingHugetlbfs) { return .unusable("MISSING faults on hugetlbfs need UFFD_FEATURE_MISSING_HUGETLBFS") }
        }
        return .usable
    }

    public func validate(_ variant: Variant, _ params: Values) throws(UsageError) {
        let size = params.size
        if size % System.pageSize != 0 { throw UsageError("size must be a multiple of the page size (\(System.pageSize) bytes)") }
        // Image + region + resident baseline (+ a staging copy for move/continue).
        // handler=external: and the image's memfd the handler process reads.
        let copies = params.resolve == .copy && params.handler != .external ? 3 : 4
        if let info = try? MemInfo.current(), UInt64(size * copies) > info.memAvailable {
            let avail = Int(info.memAvailable)
            throw UsageError("size \(formatBytes(size)) needs \(copies)× that in memory (image, region, baseline\(copies == 4 ? (params.handler == .external ? ", the handler's image memfd" : ", staging") : "")); MemAvailable is \(formatBytes(avail))")
        }
        if params.link == .netem && (params.source != .tcp || !params.sourceAddress.isEmpty || params.handler == .external) {
            throw UsageError("link=netem shapes the run's own loopback: it needs source=tcp (a local source process), no source_address, handler=in-process")
        }
        if params.policy == .huge && size % (2 << 20) != 0 { throw UsageError("policy huge needs a size that is a multiple of 2M") }
        if params.region == .memfd && params.resolve != .copy {
            throw UsageError("region=memfd goes with resolve=copy (move takes anonymous pages only; continue always uses a memfd)")
        }
        if params.region == .hugetlb {
            if size % (2 << 20) != 0 { throw UsageError("region=hugetlb needs a size that is a multiple of 2M (one hugetlb page)") }
            if params.resolve == .move { throw UsageError("region=hugetlb goes with resolve=copy (MISSING, UFFDIO_COPY of 2 MiB) or resolve=continue (MINOR on an MFD_HUGETLB memfd); UFFDIO_MOVE takes anonymous pages only") }
            if params.policy != .huge { throw UsageError("region=hugetlb needs policy=huge: a hugetlb page is installed whole (2 MiB per UFFDIO_COPY / UFFDIO_CONTINUE), never 4K at a time") }
            if params.dropEvery > 0 { throw UsageError("drop_every is tested on region=anon only") }
            let memTotal = Int((try? MemInfo.current().memTotal) ?? 0)
            if memTotal > 0 && size > memTotal / 2 { throw UsageError("region=hugetlb: a pool of \(formatBytes(size)) would be more than half of this machine's \(formatBytes(memTotal)): ask for less") }
        }
        if params.handler == .external {
            func refuse(_ what: String) -> UsageError { UsageError("handler=external \(what)") }
            if params.link != LinkKind.none { throw refuse("measures the handler hop itself: use link=none (no emulated link on top)") }
            if params.policy != .onDemand { throw refuse("serves faults on demand: use policy=on-demand (the push policies run in the in-process engine)") }
            if params.source != .memory { throw refuse("reads the image from a memfd passed with the userfaultfd: use source=memory") }
            if params.resolve != .copy || params.region == .hugetlb { throw refuse("resolves with UFFDIO_COPY into region=anon or region=memfd: use resolve=copy") }
            if params.dropEvery > 0 || params.remapAfter > 0 || params.forkAfter > 0 { throw refuse("does not follow REMOVE, REMAP or FORK events: leave drop_every, remap_after and fork_after at 0") }
            if params.injectSourceFailureS > 0 { throw refuse("has no page source to fail: use kill_handler_after_s") }
        } else if params.killHandlerAfterS > 0 {
            throw UsageError("kill_handler_after_s needs handler=external")
        }
        if params.pushUntil == .resident && !(params.policy == .backgroundPush || params.policy == .bubble || params.policy == .criuPush) {
            throw UsageError("push_until=resident needs a pushing policy: background-push, bubble or criu-push")
        }
        if params.pushUntil == .resident && params.dropEvery > 0 {
            throw UsageError("push_until=resident waits for every page, and pages the workload drops (drop_every) are never pushed: leave one of them at its default")
        }
        for (name, after) in [("remap_after", params.remapAfter), ("fork_after", params.forkAfter)] where after > 0 {
            if params.threads != 1 { throw UsageError("\(name) needs threads=1 (the one workload thread moves or forks; others would still use the old addresses)") }
            if after > params.accesses { throw UsageError("\(name)=\(after) is past the workload's \(params.accesses) accesses: it would never happen") }
            if params.resolve != .copy || params.region != .anon { throw UsageError("\(name) works with resolve=copy on region=anon") }
            if params.policy == .workingSetReplay { throw UsageError("\(name) is not combined with working-set-replay (its recording restore would not move or fork)") }
        }
        if params.region == .memfd && params.dropEvery > 0 {
            throw UsageError("drop_every uses MADV_DONTNEED, which on shmem unmaps but keeps the page-cache page (no drop to follow): use region=anon")
        }
        if params.region == .memfd && params.policy == .huge {
            throw UsageError("policy huge needs an anonymous THP region: use region=anon")
        }
        if params.policy == .huge && params.resolve != .copy && !(params.region == .hugetlb && params.resolve == .continue) {
            throw UsageError("policy huge works with resolve=copy (a THP-aligned anonymous region), or resolve=continue on region=hugetlb")
        }
        if params.resolve == .continue && params.zeroPages == .transfer {} // allowed: zero pages copied through the cache
        if params.workload == .trace {
            if params.traceFile.isEmpty { throw UsageError("workload=trace needs trace_file=PATH (one page index or @byte offset per line)") }
            _ = try TraceFile.load(params.traceFile, pages: size / System.pageSize)
        } else if !params.traceFile.isEmpty {
            throw UsageError("trace_file is read only with workload=trace")
        }
        let record = params.recordTrace
        if !record.isEmpty {
            let dir = record.contains("/") ? String(record[..<record.lastIndex(of: "/")!]) : "."
            if access(dir.isEmpty ? "/" : dir, W_OK) != 0 { throw UsageError("record_trace '\(record)': directory '\(dir)' is not writable") }
        }
        if params.killSourceAfterS > 0 && params.source != .unix && params.source != .tcp {
            throw UsageError("kill_source_after_s needs a source process: source=unix or source=tcp")
        }
        let remote = params.sourceAddress
        if !remote.isEmpty {
            if params.source != .tcp { throw UsageError("source_address is used only with source=tcp") }
            do { _ = try SocketAddress.tcp(remote) } catch { throw UsageError("source_address '\(remote)': \(error) (expected IPv4:PORT, e.g. 10.0.0.2:7070)") }
            if params.killSourceAfterS > 0 { throw UsageError("kill_source_after_s kills a source process of ours; with source_address the source is not ours") }
        }

    }

    public func deadline(_ variant: Variant, _ params: Values) -> Double { params.sourceDeadlineS * 3 + 60 }

    /// region=hugetlb borrows the 2 MiB pool (nr_hugepages) through the settings guard: one
    /// page per 2 MiB of the region (MISSING: the private MAP_HUGETLB mapping; MINOR: the
    /// memfd's page cache, which both of its mappings share). A pool the kernel cannot grow
    /// that far reads back short, and the run is skipped with the reason.
    public func settings(_ variant: Variant, _ params: Values) -> [KnobSetting] {
        guard variant == .restore, params.region == .hugetlb else { return [] }
        let needed = (params.size + (2 << 20) - 1) / (2 << 20)
        return [KnobSetting(HugeTLB.poolKnob(pageBytes: 2 << 20), String(needed), isCapacity: true)]
    }

    var restoreRegion: (Values) -> RestoreRegion {
        { p in p.region == .hugetlb ? .hugetlb : p.region == .memfd && p.resolve == .copy ? .memfd : .anon }
    }

    func config(_ p: Values) -> EngineConfig {
        var c = EngineConfig()
        c.policy = p.policy
        c.resolve = p.resolve
        c.shmemRegion = p.region == .memfd && p.resolve == .copy
        c.wait = p.wait
        c.handlerThreads = p.handlerThreads
        c.batch = p.batch
        c.windowPages = p.windowPages
        c.maxWindowPages = p.maxWindowPages
        c.pushChunkPages = max(p.pushChunk / System.pageSize, 1)
        c.pushWindowBytes = p.pushWindow
        // hugetlbfs has no UFFDIO_ZEROPAGE: its zero pages are copied like any other.
        c.zeropage = p.zeroPages == .zeropage && p.region != .hugetlb
        return c
    }

    /// The page source `source` names (nil: the in-memory image).
    func makeSource(_ p: Values, image: PageImage, channels: Int, deadlineS: Double) throws -> PageSource? {
        switch p.source {
        case .unix: return try PageSource.process(kind: .unix, image: image, channels: channels, tcpAddress: "", timeoutS: deadlineS, directory: p.sourceDir.rawValue)
        case .tcp where !p.sourceAddress.isEmpty:
            return try PageSource.remote(address: p.sourceAddress, image: image, channels: channels, timeoutS: deadlineS)
        case .tcp: return try PageSource.process(kind: .tcp, image: image, channels: channels, tcpAddress: "127.0.0.1:\(p.sourcePort)", timeoutS: deadlineS, directory: p.sourceDir.rawValue)
        case .file: return try PageSource.file(image: image, directory: p.sourceDir.rawValue, dropCache: p.fileCache == .drop)
        case .memory: return nil
        }
    }

    func link(_ p: Values) -> EmulatedLink {
        // netem is the real link: nothing is emulated on top of it.
        if p.link != LinkKind.emulated { return EmulatedLink(bytesPerSecond: 0, rttNS: 0, preempt: false) }
        return EmulatedLink(bytesPerSecond: p.bandwidthMbit * 1e6 / 8, rttNS: UInt64(p.rttMs * 1e6),
                            preempt: p.queue == .preempt)
    }

    public func run(_ ctx: RunContext, _ variant: Variant, _ p: Values) throws {
        switch variant {
        case .floors: try runFloors(ctx, p)
        case .restore: try runRestore(ctx, p)
        }
    }

    func runRestore(_ ctx: RunContext, _ p: Values) throws {
        if p.handler == .external { return try runExternal(ctx, p) }
        let pages = p.size / System.pageSize
        // A new image per repetition, except from a remote source: it serves one image.
        let seed = UInt64(p.seed) &+ (p.sourceAddress.isEmpty ? UInt64(ctx.repetition) &* 7919 : 0)
        let image = try PageImage(pages: pages, seed: seed, zeroRatio: p.zeroRatio)
        let pattern = p.workload
        let trace = pattern == .trace ? try TraceFile.load(p.traceFile, pages: pages) : []
        let threads = p.threads
        let traces = AccessTraces(pattern: pattern, pages: pages,
                                  threads: threads, opsPerThread: pattern == .trace ? (trace.count + threads - 1) / threads : p.accesses,
                                  writeRatio: p.writeRatio, zipfSkew: p.zipfSkew, seed: seed, image: image, trace: trace)
        if pattern == .trace {
            ctx.record("trace_accesses", Double(trace.count), .count, better: .none)
            if trace.count % threads != 0 { ctx.note("trace of \(trace.count) accesses over \(threads) threads: short threads repeat their last page (\(threads - trace.count % threads) padding reads)") }
        }
        let record = p.recordTrace
        if !record.isEmpty {
            try TraceFile.write(traces, to: record, note: "recorded by memlab lazy-restore: workload=\(p.workload.rawValue) threads=\(threads) size=\(p.size) seed=\(seed)")
            ctx.note("the workload's access order was written to \(record) (replay: workload=trace trace_file=\(record) threads=\(threads))")
        }
        var cfg = config(p)
        let deadlineS = p.sourceDeadlineS
        let inject = p.injectSourceFailureS
        if p.link == .netem {
            try NetemLoopback.enter(rttMs: p.rttMs, bandwidthMbit: p.bandwidthMbit)
            ctx.note("link=netem: this repetition's own network namespace, its loopback shaped by netem (delay \(formatNumber(p.rttMs / 2)) ms each way, rate \(formatNumber(p.bandwidthMbit)) Mbit/s); the source process and its TCP connections live there")
        }
        let source = try makeSource(p, image: image, channels: cfg.handlerThreads + 1, deadlineS: deadlineS)
        defer { source?.stop() }
        let killAfter = p.killSourceAfterS

        // working-set-replay: a first restore (on demand) records the faulted pages; the
        // measured restore installs them first.
        var reap: [Int32]? = nil
        if cfg.policy == .workingSetReplay {
            var first = cfg
            first.policy = .onDemand
            let rec = try performRestore(config: first, image: image, traces: traces, link: link(p), reapOrder: nil, deadlineS: deadlineS, source: source)
            if let f = rec.failed { throw ScenarioError.failed("first (recording) restore: \(f)") }
            ctx.record("first_restore_remote_faults", Double(rec.engine.remoteFaults), .count, better: .none)
            ctx.record("first_restore_total_time", Double(rec.workload.endNS - rec.workload.startNS) / 1e9, .s, better: .none)
            ctx.record("recorded_working_set", Double(rec.engine.faultOrder.count), .pages, better: .none)
            if p.replayMode == .before { reap = rec.engine.faultOrder } else { cfg.pushOrder = rec.engine.faultOrder }
        }

        let r = try performRestore(config: cfg, image: image, traces: traces, link: link(p), reapOrder: reap,
                                   deadlineS: deadlineS, injectFailureAfterS: inject > 0 ? inject : nil,
                                   source: source, killSourceAfterS: killAfter > 0 ? killAfter : nil,
                                   dropEvery: p.dropEvery, remapAfter: p.remapAfter, forkAfter: p.forkAfter,
                                   region: restoreRegion(p), untilResident: p.pushUntil == .resident)
        if let f = r.failed { throw ScenarioError.failed(f) }

        // This machine's floors, measured in this repetition (after the restore: it does not
        // compete with it), so every result carries what its figures are read against.
        var floors: [Floor] = []
        if p.floors == .measure {
            floors = try Calibration.quick(wait: cfg.wait, tcp: p.source == .tcp)
            for f in floors { ctx.record(f.name, f.value, f.unit, better: f.better) }
            // Measured inside the shaped namespace: the link's own round trip.
            if p.link == .netem, let rtt = floors.first(where: { $0.name == "floor_loopback_tcp_rtt" }) {
                let want = p.rttMs * 1e6
                ctx.check("netem_rtt", expected: want, observed: rtt.value, accepted: want...(want * 1.5 + 2e6),
                          describe: "the loopback TCP round trip in the run's namespace is netem's delay, both ways (at least rtt_ms, at most 1.5x + 2 ms)")
            }
        }

        // The same traces on resident memory: the slowdown's denominator.
        let resident = try AnonymousMapping(length: image.bytes, kind: .base)
        memcpy(resident.base, image.base, image.bytes)
        let baseline = WorkloadRun(traces: traces, region: resident.base, seed: seed)
        try baseline.start()
        baseline.release(at: Clock.nanoseconds())
        let b = baseline.join()

        let w = r.workload
        let total = Double(w.endNS - w.startNS) / 1e9
        ctx.record("total_time", total, .s, better: .lower)
        ctx.record("time_to_first_response", Double(w.firstResponseNS &- w.startNS) / 1e9, .s, better: .lower)
        if let full = r.fullyInstalledS { ctx.record("time_to_full_restore", full, .s, better: .lower) }
        ctx.record("bytes_transferred", Double(r.bytes), .bytes, better: .lower)
        ctx.record("link_bytes", Double(r.linkBytes), .bytes, better: .none)
        if p.link == LinkKind.emulated {
            ctx.check("link_carried_every_transfer", expected: Double(r.bytes), observed: Double(r.linkBytes), tolerance: 0,
                      describe: "bytes booked on the emulated link = bytes transferred (pages sent × the page size)")
        }
        if cfg.pusher {
            ctx.record("push_chunks", Double(r.engine.pushChunks), .count, better: .none)
            ctx.record("push_chunk_max", Double(r.engine.pushChunkMaxPages * System.pageSize), .bytes, better: .none)
            if r.engine.pushChunks > 0 { ctx.record("push_chunk_mean", Double(r.engine.pushChunkPagesSent * System.pageSize) / Double(r.engine.pushChunks), .bytes, better: .none) }
            if cfg.policy == .criuPush {
                ctx.record("push_chunk_resets", Double(r.engine.pushChunkResets), .count, better: .none)
                ctx.record("push_chunk_doublings", Double(r.engine.pushChunkDoublings), .count, better: .none)
            }
        }
        if p.region == .hugetlb, let used = r.hugetlbPagesInUse {
            // MISSING: a huge page per 2 MiB block installed; MINOR: the memfd's page cache
            // was filled whole before the restore.
            let blocks = p.resolve == .continue ? p.size / (2 << 20) : (r.installedPages + 511) / 512
            ctx.record("hugetlb_pages_in_use", Double(used), .pages, better: .none)
            ctx.check("hugetlb_pages_in_use", expected: Double(blocks), observed: Double(used), tolerance: 0,
                      describe: p.resolve == .continue ? "2 MiB pool pages in use = the memfd's size ÷ 2 MiB (its page cache, filled before the restore)"
                                                       : "2 MiB pool pages in use = 2 MiB blocks installed by UFFDIO_COPY")
            ctx.note("region=hugetlb: 2 MiB hugetlbfs pages, \(p.resolve == .continue ? "MINOR faults on an MFD_HUGETLB memfd (page cache filled first), UFFDIO_CONTINUE" : "MISSING faults, UFFDIO_COPY") of 2 MiB per fault; zero pages are copied (hugetlbfs has no UFFDIO_ZEROPAGE)")
        }
        ctx.record("postcopy_requests", Double(r.engine.remoteFaults), .count, better: .lower)
        ctx.record("faults_remote", Double(r.engine.remoteFaults), .count, better: .lower)
        ctx.record("faults_local", Double(r.engine.localFaults), .count, better: .none)
        ctx.record("faults_served_by_prefetch", Double(r.engine.prefetchServedFaults), .count, better: .none)
        ctx.record("faults_joined", Double(r.engine.joinedFaults), .count, better: .none)
        ctx.record("fault_messages", Double(r.engine.messages), .count, better: .none)
        var h = Histogram<UInt64>(highestTrackableValue: 600_000_000_000, numberOfSignificantValueDigits: .three)
        for v in r.engine.faultLatencyNS { _ = h.record(max(v, 1)) }
        if !r.engine.faultLatencyNS.isEmpty { ctx.recordLatency("fault_latency", h, percentiles: [50, 99, 99.9, 100]) }
        var ft = Histogram<UInt64>(highestTrackableValue: 600_000_000_000, numberOfSignificantValueDigits: .three)
        for v in w.firstTouchNS { _ = ft.record(max(v, 1)) }
        if !w.firstTouchNS.isEmpty { ctx.recordLatency("first_touch_latency", ft) }
        ctx.record("blocked_time", Double(w.blockedNS) / 1e9, .s, better: .lower)
        let touched = traces.distinctPages
        ctx.record("pages_touched", Double(touched), .pages, better: .none)
        if r.installedByPrefetch > 0 {
            ctx.record("pages_prefetched", Double(r.installedByPrefetch), .pages, better: .none)
            ctx.record("prefetch_precision", Double(r.usefulPrefetch) / Double(r.installedByPrefetch), .ratio, better: .higher)
        }
        ctx.record("prefetch_coverage", touched > 0 ? Double(r.usefulPrefetch) / Double(touched) : 0, .ratio, better: .higher)
        ctx.record("duplicate_transfers", Double(r.duplicates), .count, better: .lower)
        ctx.record("transferred_to_touched", touched > 0 ? Double(r.bytes) / Double(touched * System.pageSize) : 0, .ratio, better: .lower)
        ctx.record("ops_per_second", w.opsPerSecond, .count, better: .higher)
        ctx.record("resident_ops_per_second", b.opsPerSecond, .count, better: .higher)
        ctx.record("slowdown", w.opsPerSecond > 0 ? b.opsPerSecond / w.opsPerSecond : 0, .ratio, better: .lower)
        ctx.record("handler_cpu_time", r.engine.handlerCPUSeconds, .s, better: .lower)
        ctx.record("uffd_ioctls", Double(r.engine.ioctls), .count, better: .none)
        ctx.record("uffd_wakes", Double(r.engine.wakes), .count, better: .none)
        if let source {
            ctx.record("source_requests", Double(r.sourceRequests), .count, better: .none)
            ctx.record("source_bytes_received", Double(r.sourceBytes), .bytes, better: .none)
            if r.sourceRequests > 0 { ctx.record("source_fetch_mean", Double(r.sourceFetchNS) / Double(r.sourceRequests), .ns, better: .lower) }
            ctx.check("source_delivered_every_sent_page_once", expected: Double(r.pagesSent * System.pageSize), observed: Double(r.sourceBytes), tolerance: 0,
                      describe: "bytes the \(source.kind.rawValue) source delivered = pages sent × the page size (each page fetched once)")
            ctx.note("pages came from the \(source.label); the destination's own copy of the image served only the zero-page map and the verification")
        }
        ctx.record("uffd_eagain", Double(r.engine.eagain), .count, better: .none)
        ctx.record("deferred_installs", Double(r.engine.deferredPages), .pages, better: .none)
        ctx.record("remove_events", Double(r.engine.removeEvents), .count, better: .none)
        ctx.record("unmap_events", Double(r.engine.unmapEvents), .count, better: .none)
        if r.engine.movedUnderInstall > 0 { ctx.note("\(r.engine.movedUnderInstall) installs met ENOENT: the region moved (mremap) between the engine reading its address and the ioctl; each was retried there (at once, or after the REMAP event was handled)") }
        if r.engine.eagain > 0 { ctx.note("UFFDIO_* returned EAGAIN \(r.engine.eagain) times (the kernel's mmap_changing while a REMOVE/UNMAP event was pending): \(r.engine.deferredPages) pages deferred and retried after the next read") }
        if p.remapAfter > 0 {
            ctx.record("remap_events", Double(r.engine.remapEvents), .count, better: .none)
            if r.moveErrno != 0 { throw ScenarioError.failed("the workload's mremap failed: \(SystemError(errno: r.moveErrno, call: "mremap"))") }
            ctx.check("region_moved_and_followed", expected: 1, observed: Double(r.engine.remapEvents), tolerance: 0,
                      describe: "the workload's mremap of the whole region reached the handler as one REMAP event (installs and faults then use the new address)")
            ctx.check("region_ended_at_new_address", expected: 1, observed: r.regionMoved ? 1 : 0, tolerance: 0,
                      describe: "contents were verified at the address the region was moved to")
        }
        if p.forkAfter > 0 {
            ctx.record("fork_events", Double(r.engine.forkEvents), .count, better: .none)
            ctx.record("fork_faults", Double(r.engine.forkFaults), .count, better: .none)
            let mismatches = r.forkChildMismatches ?? -3
            if mismatches < 0 { throw ScenarioError.failed(mismatches == -2 ? "the forked child was killed by a signal" : "the workload could not fork (\(mismatches))") }
            ctx.check("fork_event_seen", expected: 1, observed: Double(r.engine.forkEvents), tolerance: 0, describe: "the workload's fork reached the handler as one FORK event")
            ctx.check("fork_child_contents_match", expected: 0, observed: Double(mismatches), tolerance: 0,
                      describe: "pages (every 7th) that differ from the source in the forked child, whose missing pages the fork server filled")
        }
        if p.dropEvery > 0 {
            ctx.record("workload_drops", Double(r.workload.drops), .count, better: .none)
            ctx.record("dropped_pages", Double(r.droppedPages), .pages, better: .none)
            ctx.record("dropped_refaults", Double(r.engine.droppedRefaults), .count, better: .none)
            ctx.check("remove_events_seen", expected: Double(r.workload.drops), observed: Double(r.engine.removeEvents), tolerance: 0,
                      describe: "each MADV_DONTNEED of the workload reached the handler as one REMOVE event")
            if p.writeRatio == 0 && cfg.policy == .onDemand && p.workload == .sequential {
                ctx.check("dropped_pages_read_zero", expected: 0, observed: Double(r.droppedNonZero), tolerance: 0,
                          describe: "pages the application dropped (MADV_DONTNEED) read as zero afterwards")
            }
        }

        // Per workload thread (UFFD_FEATURE_THREAD_ID): who waited on the link.
        if !r.faultsPerThread.isEmpty {
            let mx = r.faultsPerThread.max()!, mn = r.faultsPerThread.min()!
            let mean = Double(r.faultsPerThread.reduce(0, +)) / Double(r.faultsPerThread.count)
            ctx.record("faults_per_thread_max", Double(mx), .count, better: .none)
            ctx.record("faults_per_thread_min", Double(mn), .count, better: .none)
            ctx.record("faults_thread_imbalance", mean > 0 ? Double(mx) / mean : 0, .ratio, better: .none)
            ctx.record("faults_unattributed", Double(r.faultsUnattributed), .count, better: .lower)
            ctx.check("faults_per_thread_sum", expected: Double(r.engine.remoteFaults), observed: Double(r.faultsPerThread.reduce(0, +) + r.faultsUnattributed), tolerance: 0,
                      describe: "remote faults attributed to workload threads (by ptid) plus unattributed = remote faults")
        }
        if reap != nil {
            ctx.record("downtime", Double(r.downtimeNS) / 1e9, .s, better: .lower)
        }

        ctx.check("contents_match_source", expected: 0, observed: Double(r.mismatched), tolerance: 0,
                  describe: "installed pages differing from the source image (memcmp, after unregister)")
        ctx.check("duplicate_transfers", expected: 0, observed: Double(r.duplicates), tolerance: 0,
                  describe: "pages sent more than once, plus EEXIST conflicts")
        if let cached = r.shmemCachedPages {
            ctx.check("memfd_page_cache_pages", expected: Double(r.installedPages), observed: Double(cached), tolerance: 0,
                      describe: "pages of the memfd in the page cache (mincore) = pages installed by UFFDIO_COPY/ZEROPAGE")
        }
        ctx.check("touched_pages_installed", expected: 0, observed: Double(r.touchedNotInstalled), tolerance: 0,
                  describe: "pages the workload touched that the engine never installed")
        if cfg.policy == .onDemand && p.threads == 1 && p.dropEvery == 0 {
            ctx.check("faults_equal_distinct_pages", expected: Double(touched), observed: Double(r.engine.remoteFaults + r.engine.localFaults), tolerance: 0,
                      describe: "on-demand, one thread: remote + local (zero) faults = distinct pages touched")
        }
        let against: String
        switch (p.source, floors.isEmpty) {
        case (_, true): against = "`memlab run lazy-restore:floors` (floors=off in this run)"
        case (.tcp, _): against = "floor_fault_round_trip plus floor_loopback_tcp_rtt (a TCP source process; fault_round_trip_tcp_source in `memlab calibrate` for the whole path)"
        case (.unix, _): against = "floor_fault_round_trip plus a Unix-socket hop (fault_round_trip_unix_source in `memlab calibrate`)"
        default: against = "floor_fault_round_trip (local round trip, wait=\(cfg.wait.rawValue))"
        }
        let floorNote = p.link == LinkKind.none
            ? "link none: fault latency here is the local floor (wake-ups and ioctls only); read fault_latency / first_touch_latency against \(against)"
            : "read remote figures (fault_latency_*, first_touch_latency_*) against \(against) plus RTT \(p.rttMs) ms and size ÷ \(formatNumber(p.bandwidthMbit)) Mbit/s; bulk prefetch against floor_copy_page"
        ctx.note(floorNote)
        withExtendedLifetime(resident) {}
    }
}

// The engine's own choices, as parameter values.
// (Transfer's engine does not know LabKit: the conformance is made here.)
extension EngineConfig.Policy: ParameterChoice {}
extension EngineConfig.WaitMode: ParameterChoice {}
extension EngineConfig.Resolve: ParameterChoice {}
extension AccessTraces.Pattern: ParameterChoice { static let choices = ["sequential", "random", "zipf", "trace"] }
