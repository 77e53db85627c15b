#if canImport(Glibc)
import Glibc
#endif
import LinuxMM

extension SettingsGuard {
    /// A swap file of the run's own in the state directory, borrowed like a knob: journaled
    /// before it exists, swapped on at `priority` (above any swap the machine has, so the
    /// run's pages go there), swapped off and deleted after the run, on a signal, or by the
    /// next start. A file system that cannot hold a swap file (swapon: EINVAL or EPERM) makes
    /// the run `skipped`, saying where to point MEMLAB_STATE_DIR.
    public func borrowSwapFile(bytes: Int, priority: Int = 32000) throws {
        let path = "\(stateDirectory)/memlab-swap-\(getpid())"
        try createFile(path) { (p: String) throws(SystemError) in try Swap.makeSwapFile(path: p, bytes: bytes) }
        do {
            try activateSwap(path, priority: priority)
        } catch {
            if case .system(let e) = error, e.errno == EINVAL || e.errno == EPERM {
                throw ScenarioError.skipped("swapon \(path) refused (\(e.errnoName)): the file system of \(stateDirectory) cannot hold a swap file; set MEMLAB_STATE_DIR to a directory on ext4 or xfs")
            }
            throw error
        }
    }
}
