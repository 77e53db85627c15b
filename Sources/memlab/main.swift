#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import LabKit
import Scenarios
import LazyRestore

// A repetition's child process: memlab re-executing itself (see LabKit.Runner). It skips
// argument parsing and the settings guard entirely: children never touch knobs.
if CommandLine.arguments.count == 4 && CommandLine.arguments[1] == "_child" {
    exit(ChildMain.run(registry: allScenarios, specPath: CommandLine.arguments[2], outPath: CommandLine.arguments[3]))
}

// A worker a scenario's child starts inside its memory cgroup (see Scenarios.Guest).
if CommandLine.arguments.count >= 2 && CommandLine.arguments[1] == "_guest" {
    exit(Guest.main(Array(CommandLine.arguments.dropFirst(2))))
}

// The lazy-restore page source process (see Scenarios.PageServer).
if CommandLine.arguments.count >= 2 && CommandLine.arguments[1] == "_pagesource" {
    exit(PageServer.main(Array(CommandLine.arguments.dropFirst(2))))
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
