import ArgumentParser
import LabKit
import Scenarios
import LazyRestore
import Workloads

/// memlab re-executing itself: a repetition's child (`_child`), a worker beside it
/// (`_guest`), a lazy-restore page source (`_pagesource`), a lazy-restore fault handler
/// (`_uffdhandler`). Each is a subcommand of `memlab`
/// that its help does not show, with typed options; every value is range-checked before the
/// code runs (a command line is hostile input like any other), and a refusal exits 2 saying
/// why. The memlab target starts them before anything else: no startup recovery, no settings
/// guard, no signal handler — they never touch a knob, and die with their parent.
///
/// A target of its own so memlab-fuzz can parse these command lines as memlab does.
public enum HiddenEntryPoints {
    public static let commands: [any ParsableCommand.Type] = [ChildCommand.self, GuestCommand.self, PageSourceProcessCommand.self, UffdHandlerCommand.self]

    /// The hidden command called `name` (argv[1]), if it is one.
    public static func command(named name: String) -> (any ParsableCommand.Type)? {
        commands.first { $0.configuration.commandName == name }
    }
}

/// `memlab _child --spec=FILE --out=FILE`: one repetition, in its own process (LabKit.Runner
/// starts it; `ChildMain.arguments` is its command line).
public struct ChildCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "_child", abstract: "One repetition of a run, in its own process (started by memlab run).", shouldDisplay: false)

    @Option(help: ArgumentHelp("The repetition's spec (JSON), written by the runner.", valueName: "file")) public var spec: String
    @Option(help: ArgumentHelp("Where the repetition's output (JSON) goes.", valueName: "file")) public var out: String

    public init() {}

    public func validate() throws {
        if spec.isEmpty { throw ValidationError("--spec: empty") }
        if out.isEmpty { throw ValidationError("--out: empty") }
    }

    public func run() throws {
        let status = ChildMain.run(registry: allScenarios, specPath: spec, outPath: out)
        if status != 0 { throw ExitCode(status) }
    }
}

extension Guest.Options.Role: ExpressibleByArgument {}
extension FillPattern: ExpressibleByArgument {}

/// `memlab _guest --board=FILE --slots=N --slot=K --bytes=N …`: a worker a scenario's child
/// starts inside its memory cgroup (`Guest.spawn`; `Guest.Options.arguments` is its command
/// line). Options left out keep `Guest.Options`' defaults.
public struct GuestCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "_guest", abstract: "A worker beside a repetition's child: a memory hog, or a guest with a memory image.", shouldDisplay: false)

    @Option(help: ArgumentHelp("The status file (created by the child).", valueName: "file")) public var board: String
    @Option(help: "Slots in the status file (1…\(Guest.Options.maxSlots)).") public var slots: Int
    @Option(help: "This worker's slot (0…slots-1).") public var slot: Int
    @Option(help: "Bytes to map and write (1…\(Guest.Options.maxBytes)).") public var bytes: Int
    @Option(help: "The process that started it; exits 125 if its parent is already another.") public var parent: Int32?
    @Option(help: "hog (write once) or vm (an image, then passes).") public var role: Guest.Options.Role?
    @Option(help: "Written to /proc/self/oom_score_adj (-1000…1000).") public var oomScoreAdj: Int?
    @Option(help: "vm: fraction of the image identical in every guest (0…1).") public var sharedRatio: Double?
    @Option(help: "vm: seed of the shared pages.") public var baseSeed: UInt64?
    @Option(help: "vm: seed of the private pages.") public var seed: UInt64?
    @Option(help: "vm: pattern of the private pages.") public var privatePattern: FillPattern?
    @Flag(help: "vm: MADV_MERGEABLE on the image.") public var mergeable = false
    @Option(name: .customLong("pass-sleep-ms"), help: "vm: pause between passes (0…\(Guest.Options.maxPassSleepMS) ms).") public var passSleepMS: Int?
    @Option(help: "vm: passes before it ends (default: until killed).") public var passes: Int?
    @Flag(help: "vm: time the first touch of each page swapped out when a pass began.") public var timeSwapins = false

    public init() {}

    public var options: Guest.Options {
        var o = Guest.Options(role: role ?? .vm, bytes: bytes)
        o.board = board
        o.slots = slots
        o.slot = slot
        o.parent = parent
        o.oomScoreAdj = oomScoreAdj
        if let sharedRatio { o.sharedRatio = sharedRatio }
        if let baseSeed { o.baseSeed = baseSeed }
        if let seed { o.seed = seed }
        if let privatePattern { o.privatePattern = privatePattern }
        o.mergeable = mergeable
        if let passSleepMS { o.passSleepMS = passSleepMS }
        o.passes = passes
        o.timeSwapins = timeSwapins
        return o
    }

    public func validate() throws {
        func refuse(_ option: String, _ value: Any, _ expected: String) -> ValidationError {
            ValidationError("--\(option) '\(value)': expected \(expected)")
        }
        if board.isEmpty { throw ValidationError("--board: empty") }
        if !(1...Guest.Options.maxSlots).contains(slots) { throw refuse("slots", slots, "1…\(Guest.Options.maxSlots)") }
        if !(0..<slots).contains(slot) { throw refuse("slot", slot, "0…\(slots - 1) (--slots \(slots))") }
        if !(1...Guest.Options.maxBytes).contains(bytes) { throw refuse("bytes", bytes, "1…\(Guest.Options.maxBytes)") }
        if let parent, parent <= 0 { throw refuse("parent", parent, "a process id") }
        if let oomScoreAdj, !(-1000...1000).contains(oomScoreAdj) { throw refuse("oom-score-adj", oomScoreAdj, "-1000…1000") }
        if let sharedRatio, !(sharedRatio.isFinite && (0...1).contains(sharedRatio)) { throw refuse("shared-ratio", sharedRatio, "0…1") }
        if let passSleepMS, !(0...Guest.Options.maxPassSleepMS).contains(passSleepMS) {
            throw refuse("pass-sleep-ms", passSleepMS, "0…\(Guest.Options.maxPassSleepMS)")
        }
        if let passes, passes < 0 { throw refuse("passes", passes, "0 or more") }
    }

    public func run() throws {
        let status = Guest.run(options)
        if status != 0 { throw ExitCode(status) }
    }
}

extension PageServerOptions.Kind: ExpressibleByArgument {}

/// `memlab _pagesource --kind=unix|tcp --listen=… --pages=N --seed=N --zero-ratio=R …`: a
/// lazy-restore page source process (`PageSource.process` starts it;
/// `PageServerOptions.arguments` is its command line). Refused unless `PageServerOptions.check`
/// passes.
public struct PageSourceProcessCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "_pagesource", abstract: "A lazy-restore page source process (started by a restore with source=unix or tcp).",
        shouldDisplay: false)

    @Option(help: "unix (a socket path) or tcp (IPv4:PORT).") public var kind: PageServerOptions.Kind
    @Option(help: ArgumentHelp("The socket path or the TCP address to listen on.", valueName: "path|ipv4:port")) public var listen: String
    @Option(help: "Pages of the image (1…\(PageServerOptions.maxPages)).") public var pages: Int
    @Option(help: "The image's seed.") public var seed: UInt64
    @Option(help: "The image's fraction of zero pages (0…1).") public var zeroRatio: Double
    @Option(help: ArgumentHelp("Written \"pid port\" once it listens.", valueName: "file")) public var ready: String?
    @Option(help: "The restore that started it: dies with it; exits 1 if its parent is already another.") public var parent: Int32?
    @Flag(help: "Say on stdout where it serves.") public var announce = false
    @Option(help: "Connections served at once (\(PageServerOptions.maxConnectionsRange.lowerBound)…\(PageServerOptions.maxConnectionsRange.upperBound)).")
    public var maxConnections: Int?
    @Option(help: "Seconds a connection may go without a request (0: never).") public var idleTimeout: Double?

    public init() {}

    public var options: PageServerOptions {
        var o = PageServerOptions()
        o.kind = kind
        o.listen = listen
        o.pages = pages
        o.seed = seed
        o.zeroRatio = zeroRatio
        o.ready = ready
        o.parent = parent
        o.announce = announce
        if let maxConnections { o.maxConnections = maxConnections }
        if let idleTimeout { o.idleTimeoutS = idleTimeout }
        return o
    }

    public func validate() throws {
        if let e = options.check() { throw ValidationError(e.reason) }
    }

    public func run() throws {
        let status = PageServer.serve(options)
        if status != 0 { throw ExitCode(status) }
    }
}

/// `memlab _uffdhandler --connect=PATH --parent=PID`: lazy restore's external fault handler
/// (handler=external). It connects to the restore's Unix socket, receives the userfaultfd
/// and the image (SCM_RIGHTS) for each session and resolves the restoring process's faults
/// from another process, as CRIU's lazy-pages daemon does. Dies with its parent.
public struct UffdHandlerCommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "_uffdhandler", abstract: "A lazy-restore fault handler process (started by a restore with handler=external).",
        shouldDisplay: false)

    @Option(help: ArgumentHelp("The restore's Unix socket (at most \(ExternalFaultHandler.maxPathBytes) bytes).", valueName: "path")) public var connect: String
    @Option(help: "The restore that started it: dies with it; exits 1 if its parent is already another.") public var parent: Int32

    public init() {}

    public func validate() throws {
        if connect.isEmpty || connect.utf8.count > ExternalFaultHandler.maxPathBytes || connect.utf8.contains(0) {
            throw ValidationError("--connect '\(connect)': expected a socket path of 1…\(ExternalFaultHandler.maxPathBytes) bytes")
        }
        if parent <= 0 { throw ValidationError("--parent \(parent): expected a process id") }
    }

    public func run() throws {
        let status = ExternalFaultHandler.serve(connect: connect, parent: parent)
        if status != 0 { throw ExitCode(status) }
    }
}
