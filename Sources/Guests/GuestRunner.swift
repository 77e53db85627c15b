#if canImport(Glibc)
import Glibc
#endif
import Foundation
import LabKit
import LinuxMM
import Transfer

/// `memlab run --guest kernel=PATH,…`: the runs execute inside a QEMU guest booted with that
/// kernel and topology. The guest mounts the host's filesystem read-only over 9p and runs this
/// same memlab binary (`_guest-run`), whose own Runner borrows the guest kernel's settings
/// through its own guard and runs each repetition's child there, exactly as on a host. The
/// host's side boots the guest, follows its console, and takes each run's result from the job
/// directory as it is written. A guest that ends mid-run (killed, panicked, out of time) fails
/// the run it was in, with the console's last lines; the runs after it get a fresh guest.
/// Nothing on the host changes: QEMU is a child that dies with memlab, and every file is in
/// the run's directory.
public final class GuestRunner {
    public let spec: GuestSpec
    public let image: GuestImage
    public let accelerator: Accelerator
    /// Why KVM was not used, when it was not.
    public let acceleratorNote: String?
    private let settingsGuard: SettingsGuard?
    private let progress: (String) -> Void
    private let directory: String
    private var boots = 0
    /// The panic line of each boot that panicked before the guest's runner started.
    public private(set) var panickedBoots: [String] = []
    /// A kernel that panics in boot now and then (Debian's 6.12 under TCG, in three series of
    /// 2026-12-03: 1 of 6, 2 of 8 and 1 of 36 boots; an int3 oops in sched_clock_cpu as its
    /// static key was patched, which suggests the emulator) gets one more boot; a kernel that
    /// panics every time fails after two in a row, at the cost of one boot.
    static let maxPanicReboots = 1

    /// Whether a boot that ended is booted again: only when its kernel panicked before the
    /// guest's runner started (so no run began, and none is repeated) and fewer than
    /// `maxPanicReboots` boots in a row panicked before it.
    static func bootsAgain(running: Bool, results: Int, panic: String?, panickedInARow: Int) -> Bool {
        !running && results == 0 && panic != nil && panickedInARow < maxPanicReboots
    }

    /// Checks what needs no guest: the kernel file is a bzImage, the topology fits this
    /// machine and the accelerator asked for. A UsageError (exit 2) before anything runs.
    @discardableResult
    public static func check(_ spec: GuestSpec) throws(UsageError) -> String {
        let release: String
        do { release = try BzImage.release(of: spec.kernel) } catch {
            throw UsageError("--guest kernel=\(spec.kernel): \(error)")
        }
        // QEMU's own memory, TCG's translation cache and the page tables come on top.
        let needMiB = spec.memoryMiB + 384
        if let avail = (try? MemInfo.current())?["MemAvailable"], UInt64(needMiB) << 20 > avail {
            throw UsageError("--guest mem=\(spec.memoryMiB)M does not fit: with QEMU's own it needs about \(needMiB) MiB and this machine has \(avail >> 20) MiB available")
        }
        if spec.accel == .kvm && spec.cpus > System.onlineCPUs {
            throw UsageError("--guest cpus=\(spec.cpus) with accel=kvm: KVM runs each vCPU on a CPU of this machine, which has \(System.onlineCPUs); use accel=tcg for more")
        }
        return release
    }

    /// Why guests cannot run here (a package missing), or nil: then the runs are skipped.
    public static var missing: String? {
        if let q = QEMUProcess.missing { return q }
        if access(GuestImage.busybox, X_OK) != 0 { return "\(GuestImage.busybox) not found: apt-get install busybox-static" }
        return nil
    }

    /// Builds the image (cached) and settles the accelerator: `accel=kvm` that does not boot
    /// a guest is a UsageError; `auto` falls back to TCG and says why.
    public init(spec: GuestSpec, settingsGuard: SettingsGuard?, progress: @escaping (String) -> Void = { _ in }) throws {
        self.spec = spec
        self.settingsGuard = settingsGuard
        self.progress = progress
        try Self.check(spec)
        if let why = Self.missing { throw GuestRunError.unavailable(why) }
        directory = try RunDirectory.make()
        let cache = "\(SettingsGuard.defaultStateDirectory)/guests"
        try SettingsGuard.makeDirectory(cache, mode: 0o700)
        image = try GuestImage.build(directory: cache, kernel: spec.kernel, purpose: .hostRun)
        switch spec.accel {
        case .tcg: accelerator = .tcg; acceleratorNote = "accel=tcg asked for"
        case .kvm, .auto:
            let why = Self.probeKVM(image: image, directory: directory)
            if let why, spec.accel == .kvm { throw UsageError("--guest accel=kvm: \(why)") }
            accelerator = why == nil ? .kvm : .tcg
            // The whole reason is long (QEMU's assertion, its log): the note keeps its start.
            acceleratorNote = why.map { $0.count > 160 ? String($0.prefix(160)) + "…" : $0 }
        }
    }

    deinit { RunDirectory.removeOwn() }

    /// nil if a guest of this image boots under KVM here (its init says "ready" within
    /// `timeoutS`), else why not.
    static func probeKVM(image: GuestImage, directory: String, timeoutS: Double = 20) -> String? {
        guard access("/dev/kvm", R_OK | W_OK) == 0 else { return "/dev/kvm is not there or not usable" }
        let console = "\(directory)/kvm-probe-\(getpid()).log"
        defer { unlink(console) }
        do {
            let q = try QEMUProcess(arguments: Accelerator.kvm.qemuArguments + ["-m", "256M", "-nodefaults", "-no-reboot",
                                    "-serial", "file:\(console)", "-kernel", image.kernel, "-initrd", image.path,
                                    "-append", "console=ttyS0 panic=-1 quiet"], directory: directory, timeoutS: 10)
            defer { q.stop(timeoutS: 1) }
            let start = Clock.nanoseconds()
            while Clock.seconds(since: start) < timeoutS {
                if (ProcFile.readIfPresent(console) ?? "").contains("\(HostRunScripts.prefix) ready") { return nil }
                if let e = q.exited() { return "a guest did not boot under KVM (QEMU ended: \(e)); console: \(QEMUProcess.tail(console))" }
                Clock.sleep(nanoseconds: 50_000_000)
            }
            return "a guest did not boot under KVM within \(Int(timeoutS)) s; console: \(QEMUProcess.tail(console))"
        } catch {
            return "a guest did not boot under KVM (\(error))"
        }
    }

    /// The guest's own facts, as its memlab reported them (nil until a guest has).
    public private(set) var host: ResultDocument.Host?

    /// What the document's `host` says: the guest's facts and how it was made; when no guest
    /// reported, what was asked for (its kernel from the bzImage header).
    public var documentHost: ResultDocument.Host {
        var h = host ?? ResultDocument.Host(kernel: image.kernelRelease, arch: "x86_64", cpus: spec.cpus, memoryBytes: UInt64(spec.memoryMiB) << 20,
                                            numaNodes: spec.numaNodes, pageSize: 4096, virtualized: true, cpuModel: "unknown (the guest did not report)",
                                            features: .unknown)
        h.guest = record
        return h
    }
    public private(set) var bootS: Double?

    public var record: GuestRecord {
        GuestRecord(accelerator: accelerator.rawValue, kernelPath: spec.kernel, kernelRelease: image.kernelRelease,
                    memoryMiB: spec.memoryMiB, cpus: spec.cpus, numaNodes: spec.numaNodes, cgroup: spec.cgroup.rawValue,
                    bootS: bootS ?? 0, hypervisorKernel: HostFacts.current().kernel, qemu: Self.qemuVersion,
                    append: spec.append.isEmpty ? nil : spec.append, panickedBoots: panickedBoots.isEmpty ? nil : panickedBoots.count)
    }

    static let qemuVersion: String = {
        let f = ProbeReport.qemuFeature()
        return f.usable ? (f.detail.split(separator: ";").first.map(String.init) ?? f.detail) : "unknown"
    }()

    /// The note every run of the guest carries: where it ran, and what its timings are.
    public var note: String {
        let timing = accelerator == .tcg
            ? "timings are an emulated CPU's (TCG): compare them only with runs under TCG"
            : "timings are a KVM guest's"
        let params = spec.append.isEmpty ? "" : ", kernel parameters '\(spec.append)'"
        return "ran inside a guest: Linux \(image.kernelRelease) (\(spec.kernel)), \(spec.topologyDescription)\(params), under \(accelerator.rawValue.uppercased())\(acceleratorNote.map { " (\($0))" } ?? ""); \(timing)"
    }

    /// The note of the runs of a boot that followed one that panicked.
    static func rebootNote(_ panic: String) -> String {
        "the guest's kernel panicked in the boot before this one, before its runner started ('\(panic)'), and was booted again (a boot, not a run: no repetition is lost to it)"
    }

    /// Runs every request inside guests of this kernel and topology; a result for each, in order.
    public func execute(_ requests: [RunRequest]) -> [RunResult] {
        var results = [RunResult?](repeating: nil, count: requests.count)
        var next = 0
        // The panic lines of the boots in a row that panicked before the runner started.
        var panicsInARow: [String] = []
        while next < requests.count {
            SignalCleanup.shared.checkpoint()
            let b = boot(Array(requests[next...]), base: next)
            if let panic = b.panic, !b.running { panickedBoots.append(panic) }
            let unset = Set((next..<requests.count).filter { results[$0] == nil })
            defer {
                // The runs this boot settled, after a boot that panicked: say so.
                if let last = panicsInARow.last, b.running {
                    for i in unset where results[i] != nil { results[i]?.notes.append(Self.rebootNote(last)) }
                }
                if b.running { panicsInARow = [] }
            }
            for (i, r) in b.runs { results[i] = r }
            let missing = (next..<requests.count).filter { results[$0] == nil }
            guard let first = missing.first else { break }
            if let why = b.unusable {
                for i in missing { results[i] = Self.result(requests[i], .skipped, why) }
                break
            }
            if Self.bootsAgain(running: b.running, results: b.runs.count, panic: b.panic, panickedInARow: panicsInARow.count), let panic = b.panic {
                panicsInARow.append(panic)
                progress("[guest \(image.kernelRelease)] the kernel panicked before the guest's runner started ('\(panic)'): booting it again")
                continue
            }
            if !b.running {
                let panic = b.panic.map { "'\($0)'; " } ?? ""
                let again = panicsInARow.isEmpty ? "" : panicsInARow.last == b.panic ? ", in \(panicsInARow.count + 1) boots in a row"
                    : ", after a boot that panicked with '\(panicsInARow.last ?? "")'"
                let why = "the guest did not boot (\(panic)\(b.ending))\(again); console: \(b.consoleTail)"
                for i in missing { results[i] = Self.result(requests[i], .failed, why) }
                break
            }
            let during = b.lastProgress[first].map { " during \($0)" } ?? " before its result was written"
            results[first] = Self.result(requests[first], .failed, "the guest ended\(during) (\(b.ending)); console: \(b.consoleTail)")
            next = first + 1
        }
        return results.enumerated().map { i, r in
            var r = r ?? Self.result(requests[i], .failed, "no result")
            if !r.notes.contains(note) { r.notes.insert(note, at: 0) }
            return r
        }
    }

    static func describe(_ e: ChildExit) -> String {
        switch e {
        case .exited(let c): return "QEMU exited with status \(c)"
        case .signaled(let sig): return "QEMU was killed by \(ChildProcess.signalName(sig))"
        case .timedOut: return "QEMU did not end in time"
        }
    }

    static func result(_ r: RunRequest, _ status: RunStatus, _ reason: String) -> RunResult {
        var out = RunResult(scenario: r.scenario.id, variant: r.variant, params: r.params, placement: r.placement,
                            status: status, reason: reason, settings: SettingsRecord(), repetitions: 0, warmup: r.warmup)
        out.sweep = r.sweep
        out.paramUnits = r.scenario.parameterUnits
        return out
    }

    struct Boot {
        var runs: [Int: RunResult] = [:]
        var running = false
        var unusable: String?
        var lastProgress: [Int: String] = [:]
        var ending = ""
        var consoleTail = ""
        /// The console's "Kernel panic - not syncing: …" line, if the kernel panicked.
        var panic: String?
    }

    /// One guest: boots it for `requests` (numbered from `base`), follows it to its end.
    private func boot(_ requests: [RunRequest], base: Int) -> Boot {
        var b = Boot()
        boots += 1
        let job = "\(directory)/guest-job-\(boots)"
        let disk = "\(directory)/guest-disk-\(boots).img"
        let console = "\(directory)/guest-console-\(boots).log"
        defer { unlink(disk) }
        do {
            try Self.prepare(job: job, disk: disk, requests: requests, diskBytes: max(2 * spec.memoryMiB, 1024) << 20, cgroup: spec.cgroup,
                             modules: image.modulesDirectory)
        } catch {
            b.ending = "the job directory could not be made: \(error)"
            return b
        }
        let started = Clock.nanoseconds()
        let qemu: QEMUProcess
        do {
            qemu = try QEMUProcess(arguments: accelerator.qemuArguments + arguments(job: job, disk: disk, console: console),
                                   directory: directory, settingsGuard: settingsGuard, timeoutS: 30)
        } catch {
            b.ending = "QEMU did not start: \(error)"
            return b
        }
        let limit = Self.deadline(requests)
        var follower = ConsoleFollower(path: console)
        while true {
            SignalCleanup.shared.checkpoint()
            for line in follower.newLines() { take(line, into: &b, base: base, started: started) }
            collect(job, requests, base: base, into: &b)
            if let e = qemu.exited() { b.ending = Self.describe(e); break }
            if Clock.seconds(since: started) > limit {
                qemu.stop(timeoutS: 2)
                b.ending = "still running after \(Int(limit)) s, the guest's deadline; stopped"
                break
            }
            Clock.sleep(nanoseconds: 100_000_000)
        }
        // What the console still holds after QEMU ended (a 64 KiB read a call; 16 MiB at most).
        for _ in 0..<256 {
            let lines = follower.newLines()
            if lines.isEmpty { break }
            for line in lines { take(line, into: &b, base: base, started: started) }
        }
        collect(job, requests, base: base, into: &b)
        b.consoleTail = ConsoleFollower.tail(console)
        if host == nil, let data = GuestJob.read(job, GuestJob.hostFile, limit: GuestJob.maxHostBytes),
           var h = try? JSONDecoder().decode(ResultDocument.Host.self, from: data) {
            h.guest = nil
            host = h
        }
        return b
    }

    /// Takes the results the guest has written so far (each file once it is complete: the
    /// guest writes it atomically).
    private func collect(_ job: String, _ requests: [RunRequest], base: Int, into b: inout Boot) {
        for i in requests.indices where b.runs[base + i] == nil {
            guard let data = GuestJob.read(job, GuestJob.runFile(i), limit: GuestJob.maxRunBytes) else { continue }
            b.runs[base + i] = Self.decode(data, for: requests[i])
        }
    }

    /// A run's result from the guest, checked as untrusted input: it must decode, validate as a
    /// document would, and be the run that was asked for.
    public static func decode(_ data: Data, for r: RunRequest) -> RunResult {
        guard var run = try? JSONDecoder().decode(RunResult.self, from: data) else {
            return result(r, .failed, "the guest's result for this run is not a memlab run result")
        }
        let doc = ResultDocument(tool: .init(name: "memlab", version: ""), startedAt: "", host: .current(), runs: [run])
        do { try doc.validate() } catch { return result(r, .failed, "the guest's result for this run is invalid: \(error.message)") }
        // The parameters went through JSON on the way (a Double of 1.0 comes back an Int):
        // compared as they travelled, and recorded as they were asked for.
        let asked = (try? JSONEncoder().encode(r.params)).flatMap { try? JSONDecoder().decode(Params.self, from: $0) }
        guard run.scenario == r.scenario.id, run.variant == r.variant, run.params == asked else {
            return result(r, .failed, "the guest returned a result for \(run.scenario):\(run.variant) with other parameters, not this run")
        }
        run.params = r.params
        run.sweep = r.sweep
        return run
    }

    /// What a console line says to the host (the guest's console is untrusted text: a line
    /// that is not one of these says nothing).
    public enum ConsoleEvent: Equatable, Sendable {
        case running
        case unusable(String)
        case progress(run: Int, label: String)
    }

    /// "Kernel panic - not syncing: Fatal exception in interrupt" from a console line (the
    /// timestamp and anything before it dropped; printable ASCII, 160 characters at most and
    /// "…" when cut), or nil.
    public static func panicLine(_ line: String) -> String? {
        guard let at = line.range(of: "Kernel panic - not syncing") else { return nil }
        let kept = line[at.lowerBound...].unicodeScalars.filter { $0.value >= 0x20 && $0.value < 0x7f }
        let text = String(String.UnicodeScalarView(kept.prefix(160)))
        return kept.count > 160 ? text + "…" : text
    }

    public static func event(_ line: String) -> ConsoleEvent? {
        guard let at = line.range(of: HostRunScripts.prefix) else { return nil }
        let rest = line[at.upperBound...].drop { $0 == " " }
        if rest.hasPrefix("running") { return .running }
        if rest.hasPrefix("unusable:") { return .unusable(String(rest.dropFirst("unusable:".count)).trimmingCharacters(in: .whitespaces)) }
        if rest.hasPrefix("progress ") {
            let parts = rest.dropFirst("progress ".count).split(separator: " ", maxSplits: 1)
            guard parts.count == 2, let i = Int(parts[0]), i >= 0, i <= 1 << 20 else { return nil }
            return .progress(run: i, label: String(parts[1]))
        }
        return nil
    }

    private func take(_ line: String, into b: inout Boot, base: Int, started: UInt64) {
        if b.panic == nil, let p = Self.panicLine(line) { b.panic = p }
        switch Self.event(line) {
        case .running:
            b.running = true
            if bootS == nil { bootS = Clock.seconds(since: started) }
        case .unusable(let why): b.unusable = why
        case .progress(let i, let label):
            b.lastProgress[base + i] = label
            progress("[guest \(image.kernelRelease)] \(label)")
        case nil: break
        }
    }

    /// The guest's whole allowance: booting, and each run's deadline for every repetition (the
    /// guest's runner enforces each; this catches a guest that hangs as a whole).
    static func deadline(_ requests: [RunRequest]) -> Double {
        var total = 180.0
        for r in requests {
            let reps = Double(r.repetitions + r.warmup)
            total += (r.scenario.deadline(variant: r.variant, params: r.params) + 30) * max(reps, 1) + 60
        }
        return min(total, 7 * 86_400)
    }

    static func prepare(job: String, disk: String, requests: [RunRequest], diskBytes: Int, cgroup: GuestSpec.Cgroup, modules: String?) throws {
        guard mkdir(job, 0o700) == 0 else { throw SystemError.current("mkdir", path: job) }
        let data = try JSONEncoder().encode(GuestJob(requests))
        try AtomicFile.write(Array(data), to: "\(job)/\(GuestJob.jobFile)")
        var env = "MEMLAB_BIN=\(GuestJob.shellQuoted(ChildProcess.selfExecutable))\nMEMLAB_CGROUP=\(cgroup.rawValue)\n"
        // Modules unpacked beside the kernel: the guest lays them over /lib/modules.
        if let m = modules, !m.hasPrefix("/lib/modules/") { env += "MEMLAB_MODULES=\(GuestJob.shellQuoted(m))\n" }
        try AtomicFile.write(Array(env.utf8), to: "\(job)/\(GuestJob.envFile)")
        // The scratch disk: sparse, so it costs what the guest writes (its swap files).
        let fd = open(disk, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SystemError.current("open", path: disk) }
        defer { close(fd) }
        guard ftruncate(fd, off_t(diskBytes)) == 0 else { throw SystemError.current("ftruncate", path: disk) }
    }

    /// QEMU's command line after the accelerator's part. A path in an option value has its
    /// commas doubled (QEMU's escape).
    func arguments(job: String, disk: String, console: String) -> [String] {
        func esc(_ s: String) -> String { s.replacingOccurrences(of: ",", with: ",,") }
        // mem-merge off: QEMU otherwise marks guest RAM MADV_MERGEABLE, and this machine's
        // KSM (a host run beside it) would scan and count it.
        var a = ["-m", "\(spec.memoryMiB)M", "-smp", String(spec.cpus), "-nodefaults", "-no-reboot", "-machine", "mem-merge=off",
                 "-serial", "file:\(console)", "-kernel", spec.kernel, "-initrd", image.path,
                 "-append", "console=ttyS0 panic=-1 quiet" + (spec.append.isEmpty ? "" : " " + spec.append),
                 "-virtfs", "local,path=/,mount_tag=\(HostRunScripts.hostTag),security_model=none,readonly=on,multidevs=remap",
                 "-virtfs", "local,path=\(esc(job)),mount_tag=\(HostRunScripts.jobTag),security_model=none,multidevs=remap",
                 "-drive", "file=\(esc(disk)),if=none,id=scratch,format=raw,cache=unsafe",
                 "-device", "virtio-blk-pci,drive=scratch"]
        if spec.numaNodes > 1 {
            for i in 0..<spec.numaNodes {
                a += ["-object", "memory-backend-ram,id=node\(i),size=\(spec.nodeMiB(i))M"]
                a += ["-numa", (["node", "nodeid=\(i)", "memdev=node\(i)"] + spec.nodeCPUs(i).map { "cpus=\($0)" }).joined(separator: ",")]
            }
        }
        return a
    }
}

public enum GuestRunError: Error, CustomStringConvertible {
    /// A package is missing: the runs are skipped with this.
    case unavailable(String)
    public var description: String {
        switch self { case .unavailable(let why): return why }
    }
}

/// Reads a console log as it grows: whole lines, at most 64 KiB a call, a line longer than
/// 4 KiB cut (a guest's console is untrusted text).
public struct ConsoleFollower {
    let path: String
    private var offset: off_t = 0
    private(set) var partial: [UInt8] = []

    public init(path: String) { self.path = path }

    mutating func newLines() -> [String] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return [] }
        defer { close(fd) }
        var chunk = [UInt8](repeating: 0, count: 64 << 10)
        let n = chunk.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, offset) }
        guard n > 0 else { return [] }
        offset += off_t(n)
        return feed(chunk[0..<n])
    }

    /// Whole lines from `bytes` after what came before (kept in `partial`).
    public mutating func feed<C: Collection>(_ bytes: C) -> [String] where C.Element == UInt8 {
        var lines: [String] = []
        for byte in bytes {
            if byte == 0x0A {
                lines.append(PeerText.decode(partial))
                partial.removeAll(keepingCapacity: true)
            } else if byte != 0x0D && partial.count < 4096 {
                partial.append(byte)
            }
        }
        return lines
    }

    /// The console's last `count` non-empty lines, joined with " | " (at most 1.5 KiB): what a
    /// failed run's reason quotes.
    static func tail(_ path: String, count: Int = 8) -> String {
        var f = ConsoleFollower(path: path)
        var st = stat()
        // Only the end matters: a guest that printed a lot is not read from the start.
        if stat(path, &st) == 0, st.st_size > 256 << 10 { f.offset = st.st_size - (256 << 10) }
        var last: [String] = []
        while true {
            let lines = f.newLines()
            if lines.isEmpty { break }
            last = Array((last + lines.filter { !$0.allSatisfy { $0 == " " || $0 == "\t" } }).suffix(count))
        }
        if !f.partial.isEmpty { last = Array((last + [PeerText.decode(f.partial)]).suffix(count)) }
        let text = last.joined(separator: " | ")
        return last.isEmpty ? "(empty)" : String(text.suffix(1536))
    }
}
