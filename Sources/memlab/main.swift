#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import EntryPoints
import LabKit

// memlab re-executing itself — a repetition's child (LabKit.Runner), a worker beside it
// (Scenarios.Guest), a lazy-restore page source (Scenarios.PageServer): hidden commands
// (EntryPoints), parsed like every other, but decided on here before anything else runs. No
// startup recovery, no settings guard, no signal handler: they never touch a knob, and each
// dies with its parent. A refusal exits 2 and says why; the parent reads it in the log.
if let name = CommandLine.arguments.dropFirst().first, let hidden = HiddenEntryPoints.command(named: name) {
    do {
        var command = try Memlab.parseAsRoot()
        try command.run()
        exit(0)
    } catch let code as ExitCode {
        exit(code.rawValue)
    } catch {
        if Memlab.exitCode(for: error) == .success { Memlab.exit(withError: error) }
        writeStderr("memlab \(name): \(Memlab.message(for: error))\nusage: \(Memlab.usageString(for: hidden, includeHidden: true))\n")
        exit(ExitStatus.usage)
    }
}

// Any memlab that starts gives back what a dead memlab left changed, before anything else —
// before its arguments are even read, so a typo, --help and --version restore too. `restore`
// does the same and reports it itself; `settings` shows the machine as it is, changing nothing.
switch CommandLine.arguments.dropFirst().first {
case "restore": RunDirectory.sweepStale()
case "settings": break
default: Session.startup()
}
// SIGINT, SIGTERM and SIGHUP end every command the same way: the running child killed, what
// was borrowed restored, the run's files removed, exit 128+signal.
SignalCleanup.shared.install(settingsGuard: nil)

do {
    var command = try Memlab.parseAsRoot()
    try command.run()
    exit(0)
} catch let code as ExitCode {
    exit(code.rawValue)
} catch let e as UsageError {
    writeStderr("memlab: error: \(e.message)\n")
    exit(ExitStatus.usage)
} catch {
    if Memlab.exitCode(for: error) == .success { Memlab.exit(withError: error) }
    writeStderr(Memlab.fullMessage(for: error) + "\n")
    exit(ExitStatus.usage)
}
