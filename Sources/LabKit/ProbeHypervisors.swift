#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import LinuxMM

/// `memlab probe`'s hypervisor rows (issue 13), in libvirt's driver probe order: xen, kvm,
/// qemu, lxc, libvirt. Each answer comes from the running host — procfs, sysfs, /dev/kvm
/// asked its API version, the QEMU binary run — and nothing here traps: a file that cannot
/// be opened is an answer ("missing", "unreadable"), not an error.
///
/// Whether a guest really runs under KVM takes a boot, too slow for a probe; the guest
/// scenarios try one (`BootedGuest.probeAccelerator`) and fall back to TCG.
extension ProbeReport {
    /// The QEMU binary the guest scenarios run (Guests' `QEMUProcess.binary`).
    public static let qemuBinary = "/usr/bin/qemu-system-x86_64"
    static let kvmGuestBootNote = "a guest boot is tried by the guest scenarios (Accelerator probe)"

    public static func hypervisors() -> [Feature] {
        [xenFeature(), kvmFeature(), qemuFeature(), lxcFeature(), libvirtFeature()]
    }

    // MARK: xen

    static func xenFeature() -> Feature {
        let procXen = ProcFile.exists("/proc/xen")
        let type = ProcFile.readIfPresent("/sys/hypervisor/type")?.trimmingSpaces
        let typeText = type.map { $0.isEmpty ? "/sys/hypervisor/type is empty" : "/sys/hypervisor/type says \($0)" }
            ?? "no /sys/hypervisor/type"
        guard procXen || type == "xen" else {
            return Feature(name: "xen", usable: false, detail: type.map { _ in typeText } ?? "",
                           reason: "not running on Xen (no /proc/xen, \(type == nil ? "no /sys/hypervisor/type" : "/sys/hypervisor/type is not xen"))")
        }
        // xenfs mounted at /proc/xen has `capabilities`: "control_d" in dom0, empty in a domU.
        guard let caps = ProcFile.readIfPresent("/proc/xen/capabilities") else {
            return Feature(name: "xen", usable: false, detail: typeText,
                           reason: "Xen without xenfs: /proc/xen/capabilities missing (mount -t xenfs xenfs /proc/xen)")
        }
        let domain = caps.contains("control_d") ? "dom0" : "domU"
        return Feature(name: "xen", usable: true, detail: "\(typeText); \(domain) (xenfs at /proc/xen)", reason: nil)
    }

    // MARK: kvm

    /// KVM's module names, vendor modules first: what serves /dev/kvm.
    static let kvmModules = ["kvm_intel", "kvm_amd", "kvm_pvm", "kvm"]

    /// The module serving /dev/kvm: the first of `kvmModules` listed in /proc/modules, or
    /// (without /proc/modules: a kernel without module unloading, or a container hiding it)
    /// the first with a /sys/module directory. nil when none is found.
    static func kvmModule(procModules: String?, sysModuleExists: (String) -> Bool) -> (name: String, source: String)? {
        if let text = procModules {
            let loaded = Set(text.split(separator: "\n").compactMap { $0.split(separator: " ").first.map(String.init) })
            if let m = kvmModules.first(where: loaded.contains) { return (m, "/proc/modules") }
        }
        if let m = kvmModules.first(where: sysModuleExists) { return (m, "/sys/module") }
        return nil
    }

    /// KVM_GET_API_VERSION = _IO(KVMIO = 0xAE, 0x00).
    static let kvmGetAPIVersion: UInt = 0xAE00

    static func kvmFeature() -> Feature {
        let module = kvmModule(procModules: ProcFile.readIfPresent("/proc/modules"),
                               sysModuleExists: { ProcFile.exists("/sys/module/\($0)") })
        let moduleText = module.map { "module \($0.name) (\($0.source))" } ?? "no kvm module found (/proc/modules, /sys/module)"
        let fd = open("/dev/kvm", O_RDWR | O_CLOEXEC)
        if fd < 0 {
            let e = SystemError.current("open", path: "/dev/kvm")
            let hint: String
            switch e.errno {
            case ENOENT: hint = "no /dev/kvm: kvm_intel/kvm_amd not loaded, or no hardware virtualization exposed to this host"
            case EACCES, EPERM: hint = "\(e) (root or the kvm group needed)"
            default: hint = "\(e)"
            }
            return Feature(name: "kvm", usable: false, detail: module == nil ? "" : moduleText, reason: hint)
        }
        defer { close(fd) }
        let api = memlab_ioctl_ptr(fd, kvmGetAPIVersion, nil)
        let apiErrno = errno
        var parts = [api >= 0 ? "API version \(api)" : "KVM_GET_API_VERSION failed (\(SystemError(errno: apiErrno, call: "ioctl").errnoName))", moduleText]
        for vendor in ["kvm_intel", "kvm_amd"] {
            if let n = ProcFile.readIfPresent("/sys/module/\(vendor)/parameters/nested")?.trimmingSpaces {
                parts.append("nested=\(n) (\(vendor))")
            }
        }
        if !parts.contains(where: { $0.hasPrefix("nested=") }) { parts.append("nested n/a") }
        let detail = parts.joined(separator: "; ")

        if api != 12 {
            return Feature(name: "kvm", usable: false, detail: detail,
                           reason: api >= 0 ? "KVM_GET_API_VERSION is \(api), not 12" : "/dev/kvm did not answer KVM_GET_API_VERSION")
        }
        switch module?.name {
        case "kvm_intel", "kvm_amd":
            return Feature(name: "kvm", usable: true, detail: detail + "; " + kvmGuestBootNote, reason: nil)
        case "kvm_pvm":
            return Feature(name: "kvm", usable: false, detail: detail,
                           reason: "\(kvmGuestBootNote); kvm_pvm: stock guest kernels abort (failed to set MSR 0x10a)")
        default:
            return Feature(name: "kvm", usable: false, detail: detail,
                           reason: "\(kvmGuestBootNote); no kvm_intel or kvm_amd module serves /dev/kvm")
        }
    }

    // MARK: qemu

    public static func qemuFeature(binary: String = qemuBinary, deadline: Double = 5) -> Feature {
        guard access(binary, X_OK) == 0 else {
            return Feature(name: "qemu", usable: false, detail: "",
                           reason: "\(binary) not found: apt-get install --no-install-recommends qemu-system-x86")
        }
        switch runForOutput(binary, ["--version"], deadline: deadline) {
        case .success(let out):
            let first = out.split(separator: "\n").first.map(String.init)?.trimmingSpaces ?? ""
            return Feature(name: "qemu", usable: true,
                           detail: "\(first.isEmpty ? binary : first); TCG available (KVM: see the kvm row)", reason: nil)
        case .failure(let why):
            return Feature(name: "qemu", usable: false, detail: binary, reason: "\(binary) --version: \(why)")
        }
    }

    enum RunFailure: Error, CustomStringConvertible {
        case message(String)
        var description: String { switch self { case .message(let m): return m } }
    }

    /// Runs `executable arguments` (stdin /dev/null, stdout+stderr to a private temporary
    /// file) and waits at most `deadline` seconds (then SIGKILL): its output when it exits 0.
    static func runForOutput(_ executable: String, _ arguments: [String], deadline: Double) -> Result<String, RunFailure> {
        var template: [CChar] = []
        var fd: Int32 = -1
        for base in RunDirectory.bases {
            template = Array("\(base)/memlab-probe.XXXXXX".utf8CString)
            fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
            if fd >= 0 { break }
        }
        guard fd >= 0 else { return .failure(.message("no temporary file for its output (mkstemp)")) }
        close(fd)
        let path = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        defer { unlink(path) }
        let pid: pid_t
        do { pid = try ChildProcess.spawn(executable, arguments, outputPath: path) } catch {
            return .failure(.message("could not start: \(error)"))
        }
        let out = { (ProcFile.readIfPresent(path) ?? "").trimmingSpaces }
        switch ChildProcess.wait(pid, deadline: deadline) {
        case .exited(0): return .success(out())
        case .exited(let c): return .failure(.message("exit \(c)\(out().isEmpty ? "" : ": " + (out().split(separator: "\n").last.map(String.init) ?? ""))"))
        case .signaled(let s): return .failure(.message("killed by \(ChildProcess.signalName(s))"))
        case .timedOut(let t): return .failure(.message("still running after \(formatNumber(t)) s; killed"))
        }
    }

    // MARK: lxc

    static let containerNamespaces = ["user", "pid", "net", "mnt", "uts", "ipc"]
    static let containerControllers = ["memory", "cpu", "pids"]

    /// Where each controller is: "v1" (a cgroup mount with it in its options, or a
    /// /sys/fs/cgroup/<controller> directory) or "v2" (listed in a cgroup2 mount's
    /// cgroup.controllers). Controllers found nowhere are absent from the answer.
    static func cgroupControllers(mounts: String?, v2Controllers: (String) -> String?,
                                  v1Directory: (String) -> Bool) -> [String: String] {
        var found: [String: String] = [:]
        for line in (mounts ?? "").split(separator: "\n") {
            let f = line.split(separator: " ")
            guard f.count >= 4 else { continue }
            if f[2] == "cgroup" {
                let options = f[3].split(separator: ",").map(String.init)
                for c in containerControllers where options.contains(c) && found[c] == nil { found[c] = "v1" }
            } else if f[2] == "cgroup2", let text = v2Controllers(String(f[1])) {
                let listed = text.split(whereSeparator: { $0 == " " || $0 == "\n" }).map(String.init)
                for c in containerControllers where listed.contains(c) { found[c] = "v2" }
            }
        }
        for c in containerControllers where found[c] == nil && v1Directory(c) { found[c] = "v1" }
        return found
    }

    static func lxcFeature() -> Feature {
        let missingNS = containerNamespaces.filter { !ProcFile.exists("/proc/self/ns/\($0)") }
        let controllers = cgroupControllers(
            mounts: ProcFile.readIfPresent("/proc/self/mounts"),
            v2Controllers: { ProcFile.readIfPresent("\($0)/cgroup.controllers") },
            v1Directory: { name in
                var st = stat()
                return stat("/sys/fs/cgroup/\(name)", &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
            })
        let missingCtl = containerControllers.filter { controllers[$0] == nil }
        let lxcPaths: [String] = ["/usr/bin/lxc-start", "/usr/sbin/lxc-start", "/usr/local/bin/lxc-start"]
        let lxcStart = lxcPaths.first { access($0, X_OK) == 0 }
        let nsText = "namespaces " + containerNamespaces.map { missingNS.contains($0) ? "\($0)(missing)" : $0 }.joined(separator: " ")
        let ctlText = "cgroup " + containerControllers.map { c in controllers[c].map { "\(c)(\($0))" } ?? "\(c)(missing)" }.joined(separator: " ")
        let detail = "\(nsText); \(ctlText); lxc-start \(lxcStart.map { "at \($0)" } ?? "not installed (not needed)")"
        var missing: [String] = []
        if !missingNS.isEmpty { missing.append("namespace \(missingNS.joined(separator: ", ")) (no /proc/self/ns entry)") }
        if !missingCtl.isEmpty { missing.append("cgroup controller \(missingCtl.joined(separator: ", ")) not mounted") }
        return Feature(name: "lxc", usable: missing.isEmpty, detail: detail,
                       reason: missing.isEmpty ? nil : "a container needs " + missing.joined(separator: "; "))
    }

    // MARK: libvirt

    static let libvirtSockets = ["/run/libvirt/libvirt-sock", "/var/run/libvirt/libvirt-sock",
                                 "/run/libvirt/virtqemud-sock", "/var/run/libvirt/virtqemud-sock"]

    static func libvirtFeature() -> Feature {
        let found = libvirtSockets.first { path in
            var st = stat()
            return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFSOCK
        }
        if let s = found { return Feature(name: "libvirt", usable: true, detail: "socket \(s)", reason: nil) }
        return Feature(name: "libvirt", usable: false, detail: "", reason: "no libvirtd socket (libvirt is not needed by memlab)")
    }
}

private extension String {
    var trimmingSpaces: String {
        var s = Substring(self)
        while let c = s.first, c.isWhitespace { s.removeFirst() }
        while let c = s.last, c.isWhitespace { s.removeLast() }
        return String(s)
    }
}
