#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Guests
import LabKit
import LinuxMM
import Migration
import Transfer

extension VMScenario {
    /// A real QEMU live migration of a guest whose agent dirties memory at a set rate, over
    /// TCP on loopback, with QEMU's own remedies as parameters. The destination is held paused
    /// (-S) when the migration completes so both sides' guest memory can be dumped (QMP
    /// pmemsave) and compared page by page; then it runs, and its agent must answer. memlab's
    /// own pre-copy model runs on the same size, dirty rate and bandwidth in the same
    /// repetition: `*_model_ratio` says where it holds.
    func runMigrate(_ lab: VMLab, _ ctx: RunContext, _ p: Values) throws {
        var config = GuestConfig(memoryMiB: p.memoryMiB)
        config.merge = false
        let source = try lab.boot(config)
        lab.recordBoot([source])
        let agent = try lab.agent(source)
        let fillBytes = UInt64(p.fillMiB) << 20
        let pageSize = UInt64(source.hello?.pageSize ?? 4096)
        _ = try agent.fill(region: 0, bytes: fillBytes, seed: 0x6D69_6772, timeoutS: 300)
        let used = try agent.meminfo(timeoutS: 10)
        let usedBytes = used.memTotal &- min(used["MemFree"] ?? 0, used.memTotal)
        let hotPPM = UInt32(max(1, min(1_000_000, (p.hotFraction * 1e6).rounded())))
        if p.dirtyRate > 0 {
            try agent.dirtyStart(region: 0, hotPPM: hotPPM, pagesPerS: UInt64(p.dirtyRate), seed: 0xD127, timeoutS: 10)
        }

        var destConfig = config
        destConfig.incoming = "defer"
        destConfig.startPaused = true
        let dest = try lab.boot(destConfig)
        let src = source.qemu.qmp, dst = dest.qemu.qmp
        var caps: [String: Bool] = ["events": true]
        if p.mode != .precopy { caps["postcopy-ram"] = true }
        if p.mode == .postcopyPreempt { caps["postcopy-preempt"] = true }
        if p.multifd > 0 { caps["multifd"] = true }
        try setCapabilities(dst, caps)
        var srcCaps = caps
        if p.autoConverge { srcCaps["auto-converge"] = true }
        if p.xbzrle { srcCaps["xbzrle"] = true }
        try setCapabilities(src, srcCaps)
        if p.multifd > 0 {
            for q in [src, dst] { try q.execute("migrate-set-parameters", arguments: ["multifd-channels": .number(Double(p.multifd))], timeoutS: 5) }
        }
        let bandwidth = p.bandwidthMbit * 1e6 / 8
        // shaped: QEMU is told the link's speed (so its downtime estimate is right) but the
        // relay is what holds the bytes to it, stop-and-copy included.
        try src.execute("migrate-set-parameters", arguments: [
            "max-bandwidth": .number(bandwidth.rounded()), "max-postcopy-bandwidth": .number(bandwidth.rounded()),
            "downtime-limit": .number(p.downtimeTargetMs.rounded()),
        ], timeoutS: 5)
        try dst.execute("migrate-incoming", arguments: ["uri": .string("tcp:127.0.0.1:0")], timeoutS: 5)
        var port = try listeningPort(dst)
        var relay: ShapedRelay?
        if p.link == .shaped {
            let r = try ShapedRelay(to: try SocketAddress.tcp("127.0.0.1:\(port)"), bytesPerSecond: bandwidth)
            relay = r
            port = Int(r.port)
        }
        defer { relay?.stop() }

        let t0 = Clock.nanoseconds()
        try src.execute("migrate", arguments: ["uri": .string("tcp:127.0.0.1:\(port)")], timeoutS: 10)
        if p.mode != .precopy {
            // Post-copy at once: QEMU switches at its next iteration, so nearly every page
            // moves by post-copy (a request on fault, the rest pushed) — the mechanism itself,
            // not a pre-copy that happened to converge first.
            try src.execute("migrate-start-postcopy", timeoutS: 5)
        }
        let endStates: Set<String> = ["completed", "failed", "cancelled"]
        let end: QMPEvent
        do {
            end = try src.firstEvent(timeoutS: p.timeoutS) { $0.name == "MIGRATION" && endStates.contains($0.data["status"]?.string ?? "") }
        } catch {
            // Did not end in time: what QEMU reached, then cancelled. Not converging is a
            // result, not a failure; anything else (QEMU gone, garbage) is a failure.
            guard case .timeout = error else {
                throw ScenarioError.failed("the source's migration events stopped (\(error)); source log: \(QEMUProcess.tail(source.qemu.logPath)); console: \(QEMUProcess.tail(source.consolePath))")
            }
            let q = try? src.execute("query-migrate", timeoutS: 5)
            _ = try? src.execute("migrate_cancel", timeoutS: 5)
            ctx.record("converged", 0, .count, better: .higher)
            if let r = q?["ram"]?["dirty-sync-count"]?.int { ctx.record("rounds", Double(r), .count, better: .none) }
            if let b = q?["ram"]?["transferred"]?.int { ctx.record("bytes_transferred", Double(b), .bytes, better: .none) }
            if let c = q?["cpu-throttle-percentage"]?.int { ctx.record("cpu_throttle_percentage", Double(c), .percent, better: .none) }
            ctx.note("migrate: QEMU did not complete within timeout_s=\(p.timeoutS) s (status \(q?["status"]?.string ?? "?")) and was cancelled; raise bandwidth_mbit, lower dirty_rate, or try auto_converge")
            return
        }
        guard end.data["status"]?.string == "completed" else {
            throw ScenarioError.failed("QEMU's migration ended \(end.data["status"]?.string ?? "?"); source log: \(QEMUProcess.tail(source.qemu.logPath)); destination log: \(QEMUProcess.tail(dest.qemu.logPath))")
        }
        let hostTotal = Clock.seconds(since: t0)
        let info = try src.execute("query-migrate", timeoutS: 5)
        let setup = src.events.first { $0.name == "MIGRATION" && $0.data["status"]?.string == "setup" }
        let stop = src.events.first { $0.name == "STOP" }
        // The destination would resume here (it is held by -S for the memory check): at the
        // switch to post-copy, or when pre-copy completed.
        let wentPostcopy = src.events.contains { $0.name == "MIGRATION" && $0.data["status"]?.string == "postcopy-active" }
        let resumeState = wentPostcopy ? "postcopy-active" : "completed"
        if p.mode != .precopy && !wentPostcopy { ctx.note("migrate: pre-copy completed before QEMU switched to post-copy") }
        func destination(_ state: String, _ timeoutS: Double) throws -> QMPEvent {
            do { return try dst.firstEvent(timeoutS: timeoutS) { $0.name == "MIGRATION" && $0.data["status"]?.string == state } } catch {
                let seen = dst.events.map { "\($0.name)\($0.data["status"]?.string.map { " " + $0 } ?? "")" }
                throw ScenarioError.failed("the destination did not reach \(state) (\(error)); its events: \(seen.joined(separator: ", ")); its log: \(QEMUProcess.tail(dest.qemu.logPath))")
            }
        }
        let arrived = try destination(resumeState, 30)
        // The end is when the destination has everything (the source says "completed" while
        // its last bytes may still be crossing a slow link).
        let landed = try destination("completed", p.timeoutS)
        if let relay { ctx.record("link_bytes", Double(relay.forwarded), .bytes, better: .none) }

        ctx.record("converged", 1, .count, better: .higher)
        if let setup { ctx.record("total_time", max(landed.time, end.time) - setup.time, .s, better: .lower) } else {
            ctx.record("total_time", hostTotal, .s, better: .lower)
            ctx.note("migrate: the source's setup event was not kept; total_time is the host's clock from the migrate command")
        }
        if let stop { ctx.record("downtime", max(0, arrived.time - stop.time), .s, better: .lower) }
        if let t = info["total-time"]?.int { ctx.record("qemu_total_time", Double(t) / 1000, .s, better: .none) }
        if let d = info["downtime"]?.int { ctx.record("qemu_downtime", Double(d) / 1000, .s, better: .none) }
        let ram = info["ram"]
        if let b = ram?["transferred"]?.int { ctx.record("bytes_transferred", Double(b), .bytes, better: .lower) }
        if let r = ram?["dirty-sync-count"]?.int { ctx.record("rounds", Double(r), .count, better: .lower) }
        if let n = ram?["normal"]?.int { ctx.record("normal_pages", Double(n), .pages, better: .none) }
        if let z = ram?["duplicate"]?.int { ctx.record("zero_pages", Double(z), .pages, better: .none) }
        if let r = ram?["postcopy-requests"]?.int { ctx.record("postcopy_requests", Double(r), .count, better: .none) }
        if let x = info["xbzrle-cache"] {
            for (k, name) in [("cache-miss", "xbzrle_cache_miss"), ("overflow", "xbzrle_overflow"), ("bytes", "xbzrle_bytes")] {
                if let v = x[k]?.int { ctx.record(name, Double(v), k == "bytes" ? .bytes : .count, better: .none) }
            }
        }
        if let c = info["cpu-throttle-percentage"]?.int { ctx.record("cpu_throttle_percentage", Double(c), .percent, better: .none) }

        // Memory: every page of guest RAM on the destination equals the source's at stop.
        let ramBytes = UInt64(p.memoryMiB) << 20
        let (mismatched, nonZero, frames) = try compareGuestMemory(src, dst, bytes: ramBytes, pageSize: pageSize, directory: lab.directory)
        if mismatched > 0 {
            ctx.note("migrate: \(mismatched) guest pages differ between source and destination at stop time; the first guest-physical frames: \(frames.map { "0x" + String($0, radix: 16) }.joined(separator: " "))")
        }
        ctx.record("nonzero_pages", Double(nonZero), .pages, better: .none)
        ctx.check("destination_mismatched_pages", expected: 0, observed: Double(mismatched), tolerance: 0,
                  describe: "every page of guest RAM on the destination equals the source's at stop time (QMP pmemsave of both, compared page by page)")

        // Then the destination runs, and the same agent must answer there. A guest that died
        // or hangs after the move is a result (a check that disagrees, its console in a note),
        // not a lost repetition: the memory figures above stay in the document.
        try dst.execute("cont", timeoutS: 10)
        var alive = true
        var dirtied: (pages: UInt64, seconds: Double, hotPages: UInt64)?
        do {
            try dest.connectAgent(timeoutS: 60)
            if p.dirtyRate > 0 { dirtied = try lab.agent(dest).dirtyStop(timeoutS: 30) }
        } catch {
            alive = false
            ctx.note("migrate: the destination guest did not answer after it resumed (\(error))")
        }
        ctx.check("destination_alive", expected: 1, observed: alive ? 1 : 0, tolerance: 0, describe: "the migrated guest's agent answers HELLO and DIRTY_STOP")
        if let d = dirtied {
            let achieved = d.seconds > 0 ? Double(d.pages) / d.seconds : 0
            ctx.record("guest_dirty_rate", achieved, .pagesPerSecond, better: .none)
            // Held to the rate only in a plain pre-copy: auto-converge throttles the vCPU on
            // purpose, and a post-copy destination's faults stall it (measured: 2-6 % short).
            if !p.autoConverge && p.mode == .precopy {
                ctx.check("guest_dirty_rate", expected: Double(p.dirtyRate), observed: achieved, tolerance: Double(p.dirtyRate) * 0.05,
                          describe: "the agent dirtied at the rate asked, within 5% (guest clock, which stops while the VM is paused)")
            }
        }

        // memlab's model on the same figures: the guest's non-zero pages (QEMU sends zero
        // pages as a header), its dirty rate over its hot pages, the same bandwidth and
        // downtime target.
        let hotPages = Int(Double(fillBytes / pageSize) * p.hotFraction)
        let model = LinkModel(bandwidth: bandwidth, rtt: 0.0001)
        let modelBytes = max(nonZero, hotPages, 1) * Int(pageSize)
        let modelRun = try MigrationScenario.emulatePrecopy(size: modelBytes, dirtyRate: Double(p.dirtyRate), hotPages: hotPages,
                                                            model: model, downtimeTarget: p.downtimeTargetMs / 1000, maxRounds: 30, seed: 0x4D4F_444C)
        ctx.record("model_total_time", modelRun.totalTime, .s, better: .none)
        ctx.record("model_downtime", modelRun.downtime, .s, better: .none)
        ctx.record("model_rounds", Double(modelRun.rounds.count), .count, better: .none)
        ctx.record("model_bytes_transferred", Double(modelRun.pagesTransferred) * Double(pageSize), .bytes, better: .none)
        if let setup, modelRun.totalTime > 0 { ctx.record("total_time_model_ratio", (max(landed.time, end.time) - setup.time) / modelRun.totalTime, .ratio, better: .none) }
        if let stop, modelRun.downtime > 0 { ctx.record("downtime_model_ratio", max(0, arrived.time - stop.time) / modelRun.downtime, .ratio, better: .none) }
        let linkText = p.link == .shaped
            ? "through memlab's relay shaped to \(p.bandwidthMbit) Mbit/s all the way (stop-and-copy included)"
            : "on loopback at QEMU's max-bandwidth \(p.bandwidthMbit) Mbit/s, which QEMU lifts for the final stop-and-copy: downtime here is not a real link's"
        ctx.note("migrate: \(p.mode.rawValue) of a \(p.memoryMiB) MiB guest (\(usedBytes >> 20) MiB in use, \(p.fillMiB) MiB dirtied at \(p.dirtyRate) pages/s over \(p.hotFraction)) \(linkText); total_time and downtime from QEMU's event stamps (source STOP → destination \(resumeState))")
        ctx.note("migrate: the model is memlab's pre-copy (uffd-wp tracking, emulated link) on the guest's \(modelBytes >> 20) MiB of non-zero pages, of which \(hotPages) pages are dirtied at the same rate\(p.mode == .precopy ? "" : "; it models pre-copy only, so for post-copy the ratios compare against a pre-copy of the same figures"); accelerator \(lab.accelerator.rawValue)")
    }

    func setCapabilities(_ q: QMPClient, _ caps: [String: Bool]) throws {
        let list = caps.sorted { $0.key < $1.key }.map { JSONValue.object(["capability": .string($0.key), "state": .bool($0.value)]) }
        try q.execute("migrate-set-capabilities", arguments: ["capabilities": .array(list)], timeoutS: 5)
    }

    /// The port a destination listens on after `migrate-incoming tcp:127.0.0.1:0`.
    func listeningPort(_ q: QMPClient) throws -> Int {
        let info = try q.execute("query-migrate", timeoutS: 5)
        guard case .array(let addrs)? = info["socket-address"], let port = addrs.first?["port"]?.string.flatMap({ Int($0) }),
              (1...65535).contains(port) else {
            throw ScenarioError.failed("the destination did not say which port it listens on (query-migrate: \(info))")
        }
        return port
    }

    /// Dumps guest RAM of both (paused) sides with pmemsave; counts the pages that differ, and
    /// the source's pages that are not zero (what pre-copy sends in full: the model's size).
    func compareGuestMemory(_ src: QMPClient, _ dst: QMPClient, bytes: UInt64, pageSize: UInt64, directory: String) throws -> (differ: Int, nonZero: Int, frames: [Int]) {
        let a = "\(directory)/source-ram.bin", b = "\(directory)/destination-ram.bin"
        defer { unlink(a); unlink(b) }
        try src.execute("pmemsave", arguments: ["val": .number(0), "size": .number(Double(bytes)), "filename": .string(a)], timeoutS: 120)
        try dst.execute("pmemsave", arguments: ["val": .number(0), "size": .number(Double(bytes)), "filename": .string(b)], timeoutS: 120)
        let ma = try ReadOnlyFile(path: a), mb = try ReadOnlyFile(path: b)
        guard ma.length == Int(bytes), mb.length == Int(bytes) else {
            throw ScenarioError.failed("pmemsave wrote \(ma.length) and \(mb.length) bytes, asked for \(bytes)")
        }
        var differ = 0, nonZero = 0
        var frames: [Int] = []
        let page = Int(pageSize)
        for off in stride(from: 0, to: ma.length, by: page) {
            if memcmp(ma.base + off, mb.base + off, page) != 0 {
                differ += 1
                if frames.count < 16 { frames.append(off / page) }
            }
            let words = (ma.base + off).assumingMemoryBound(to: UInt64.self)
            var any: UInt64 = 0
            for w in 0..<(page / 8) { any |= words[w] }
            if any != 0 { nonZero += 1 }
        }
        return (differ, nonZero, frames)
    }
}

/// A file mapped read-only, unmapped when released.
final class ReadOnlyFile {
    let base: UnsafeRawPointer
    let length: Int
    init(path: String) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError.current("open", path: path) }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw SystemError.current("fstat", path: path) }
        length = Int(st.st_size)
        guard length > 0, let p = mmap(nil, length, PROT_READ, MAP_PRIVATE, fd, 0), p != MAP_FAILED else {
            throw SystemError(errno: length > 0 ? errno : EINVAL, call: "mmap", path: path)
        }
        base = UnsafeRawPointer(p)
    }
    deinit { munmap(UnsafeMutableRawPointer(mutating: base), length) }
}
