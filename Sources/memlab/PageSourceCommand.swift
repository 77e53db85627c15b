#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import LabKit
import Scenarios
import Transfer
import LazyRestore

/// `memlab pagesource`: the lazy-restore page source as a command of its own, so a restore on
/// one host (`lazy-restore:restore source=tcp source_address=HOST:PORT`) can fetch its pages
/// from another. It serves until killed (Ctrl-C).
struct PageSourceCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pagesource",
        abstract: "Serve a lazy-restore image over TCP (the page protocol of docs/lazy-restore-protocol.md) until killed.",
        discussion: """
        The image is generated from --size, --seed and --zero-ratio exactly as the restore generates the one it \
        verifies against, so give both sides the same three values.

        Example (two hosts):
          hostB$ memlab pagesource --listen 10.0.0.2:7070 --size 64M --seed 1
          hostA$ sudo memlab run lazy-restore:restore --set source=tcp --set source_address=10.0.0.2:7070 --set size=64M --set seed=1
        """)

    @Option(help: ArgumentHelp("Address to listen on.", valueName: "ipv4:port")) var listen: String
    @Option(help: "Image size (K, M, G suffix), as the restore's `size`.") var size = "64M"
    @Option(help: "Image seed, as the restore's `seed`.") var seed = 1
    @Option(help: "Fraction of zero pages, as the restore's `zero_ratio`.") var zeroRatio = 0.1
    @Option(help: "Connections served at once (1…4096); one more gets an ERROR frame and is closed. A restore opens handler_threads + 1.") var maxConnections = 64
    @Option(help: "Seconds a connection may go without a request before it gets an ERROR frame and is closed (0: never; at most 86400). Set it above the longest pause between a restore's faults.") var idleTimeout = 300.0

    func run() throws {
        let scenario = LazyRestoreScenario()
        guard case .int(let bytes) = try scenario.parse(parameter: "size", size) else { throw UsageError("--size: expected a size such as 64M") }
        guard case .int = try scenario.parse(parameter: "seed", String(seed)) else { throw UsageError("--seed: expected an integer") }
        guard zeroRatio.isFinite, (0...1).contains(zeroRatio) else { throw UsageError("--zero-ratio must be within 0...1") }
        try NetLimits.check("max-connections", maxConnections, PageServerOptions.maxConnectionsRange)
        try NetLimits.check("idle-timeout", idleTimeout, PageServerOptions.idleTimeoutRange, unit: "s (0: never)")
        do { _ = try SocketAddress.tcp(listen) } catch { throw UsageError("--listen '\(listen)': \(error) (expected IPv4:PORT)") }
        // It serves until killed: make sure the usual signals can (a parent may have left
        // them blocked in the mask this process inherited).
        var set = sigset_t()
        sigemptyset(&set)
        for sig in [SIGINT, SIGTERM, SIGHUP] { sigaddset(&set, sig) }
        sigprocmask(SIG_UNBLOCK, &set, nil)
        var o = PageServerOptions()
        o.kind = .tcp
        o.listen = listen
        o.pages = bytes / 4096
        o.seed = UInt64(clamping: seed)
        o.zeroRatio = zeroRatio
        o.announce = true
        o.maxConnections = maxConnections
        o.idleTimeoutS = idleTimeout
        if let e = o.check() { throw UsageError(e.reason) }
        throw ExitCode(PageServer.serve(o))
    }
}
