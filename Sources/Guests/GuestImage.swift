#if canImport(Glibc)
import Glibc
#endif
import Foundation
import LinuxMM
import Transfer

/// A guest's initramfs, built by memlab from distribution parts and nothing downloaded:
/// Debian's static busybox, memlab's own agent (`AgentBinary`), the kernel's virtio modules
/// where they are modules, and an `/init` script, written as an uncompressed `newc` cpio
/// archive (the kernel takes it as is). Cached in the state directory under the hash of its
/// contents, so a changed input makes a new image and an unchanged one is reused.
public struct GuestImage: Sendable {
    public static let busybox = "/bin/busybox"
    /// The distribution's kernel (linux-image-amd64), newest first.
    public static var distributionKernel: String? {
        ProcFile.list("/boot").filter { $0.hasPrefix("vmlinuz-") }.sorted().last.map { "/boot/\($0)" }
    }
    /// Why a guest cannot be built here, or nil.
    public static var missing: String? {
        if let q = QEMUProcess.missing { return q }
        if access(busybox, X_OK) != 0 { return "\(busybox) not found: apt-get install busybox-static" }
        if distributionKernel == nil { return "no kernel in /boot: apt-get install --no-install-recommends linux-image-amd64" }
        return AgentBinary.missing
    }

    /// The line `/init` prints on the serial console once the guest is up.
    public static let readyMarker = "memlab-guest: ready"
    /// What the image is for: a guest running memlab's agent (the vm scenarios), or a guest
    /// running the host's own memlab from the host's filesystem (`memlab run --guest`).
    public enum Purpose: Sendable {
        case agent, hostRun
        /// The modules the guest needs, loaded by /init in dependency order where the kernel
        /// has them as modules: virtio PCI and the agent's console port and the balloon; or
        /// 9p over virtio for the host's filesystem and virtio-blk for the scratch disk.
        var wantedModules: [String] {
            switch self {
            case .agent: return ["virtio_pci", "virtio_console", "virtio_balloon"]
            // overlay: the run script's overlays, and the one that shows a kernel's modules
            // unpacked beside it (not under the host's /lib/modules) to module autoloading.
            case .hostRun: return ["virtio_pci", "9pnet_virtio", "9p", "virtio_blk", "overlay"]
            }
        }
    }

    public let path: String
    public let kernel: String
    /// The kernel's release, from its bzImage header ("6.1.0-57-amd64").
    public let kernelRelease: String
    /// The kernel's modules (…/lib/modules/RELEASE): the host's, or those unpacked beside a
    /// kernel from its package; nil when there are none.
    public let modulesDirectory: String?

    /// Builds (or finds) the image in `directory` for `kernel` (a bzImage; default: the
    /// distribution's): busybox, the agent, the modules, and an init that mounts /proc, /sys
    /// and /dev, loads the modules, prints the ready line with the guest's uptime, runs the
    /// agent on its virtio-serial port, and powers off when it ends.
    public static func build(directory: String, kernel: String? = nil, purpose: Purpose = .agent) throws -> GuestImage {
        guard let kernel = kernel ?? distributionKernel else { throw SystemError(errno: ENOENT, call: "find a kernel in /boot") }
        let release = try BzImage.release(of: kernel)
        let modulesDirectory = KernelModules.directory(release: release, kernel: kernel)
        let modules = KernelModules.loadOrder(directory: modulesDirectory, wanted: purpose.wantedModules)
        var archive = CPIOWriter()
        for dir in ["bin", "proc", "sys", "dev", "tmp", "lib", "lib/modules"] { archive.directory(dir) }
        archive.file("bin/busybox", try Data(contentsOf: URL(fileURLWithPath: busybox)), mode: 0o755)
        for m in modules { archive.file("lib/modules/\(m.name).ko", try Data(contentsOf: URL(fileURLWithPath: m.path)), mode: 0o644) }
        switch purpose {
        case .agent:
            let agent = try AgentBinary.build(directory: directory)
            archive.file("bin/memlab-agent", try Data(contentsOf: URL(fileURLWithPath: agent)), mode: 0o755)
            archive.file("init", Data(initScript(modules: modules.map(\.name)).utf8), mode: 0o755)
        case .hostRun:
            archive.directory("host")
            archive.file("init", Data(HostRunScripts.initScript(modules: modules.map(\.name)).utf8), mode: 0o755)
            archive.file("guest-run.sh", Data(HostRunScripts.runScript.utf8), mode: 0o644)
        }
        let data = archive.finish()
        // FNV-1a of the archive: the cache key (a changed busybox, agent or module makes a new name).
        let path = "\(directory)/guest-\(String(AgentBinary.fnv1a(data), radix: 16)).cpio"
        if !ProcFile.exists(path) {
            try AtomicFile.write(Array(data), to: path)
            prune(directory: directory, prefix: "guest-", keeping: path)
        }
        return GuestImage(path: path, kernel: kernel, kernelRelease: release, modulesDirectory: modulesDirectory)
    }

    /// Keeps the cache small: the newest four files named PREFIX* (one per kernel a user
    /// alternates between), `keeping` always.
    static func prune(directory: String, prefix: String, keeping: String) {
        func mtime(_ name: String) -> Int {
            var st = stat()
            return stat("\(directory)/\(name)", &st) == 0 ? st.st_mtim.tv_sec : 0
        }
        let names = ProcFile.list(directory).filter { $0.hasPrefix(prefix) && !$0.hasSuffix(".partial") }
        for old in names.sorted(by: { mtime($0) > mtime($1) }).dropFirst(4) where "\(directory)/\(old)" != keeping {
            unlink("\(directory)/\(old)")
        }
    }

    /// What every memlab guest's /init does first (busybox as PID 1): its applets, /proc,
    /// /sys and /dev, the modules in order, and the ready line with the guest's uptime.
    static func initPrologue(modules: [String]) -> String {
        """
        #!/bin/busybox sh
        /bin/busybox --install -s /bin
        mount -t proc proc /proc
        mount -t sysfs sys /sys
        mount -t devtmpfs dev /dev
        for m in \(modules.joined(separator: " ")); do insmod /lib/modules/$m.ko 2>/dev/null; done
        echo "\(readyMarker) uptime $(cut -d' ' -f1 /proc/uptime)"

        """
    }

    static func initScript(modules: [String]) -> String {
        initPrologue(modules: modules) + """
        # The port appears once the host's control message has been handled: wait up to 10 s.
        port=""
        for i in $(seq 100); do
          for d in /sys/class/virtio-ports/*; do
            [ -e "$d/name" ] && [ "$(cat $d/name)" = \(GuestAgent.portName) ] && port=/dev/${d##*/}
          done
          [ -n "$port" ] && [ -e "$port" ] && break
          sleep 0.1
        done
        if [ -n "$port" ]; then
          /bin/memlab-agent "$port"
          echo "memlab-guest: the agent ended ($?)"
        else
          echo "memlab-guest: no virtio-serial port \(GuestAgent.portName)"
        fi
        poweroff -f
        """
    }
}

/// A kernel image's header: what makes a file a bzImage, and the release it names.
public enum BzImage {
    /// The release string of the bzImage at `path` ("6.1.0-57-amd64"), or an error saying
    /// the file is not a bzImage (Documentation/arch/x86/boot.rst: "HdrS" at 0x202, the
    /// version string's offset − 0x200 at 0x20E).
    public static func release(of path: String) throws -> String {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError.current("open", path: path) }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw SystemError.current("fstat", path: path) }
        guard (st.st_mode & S_IFMT) == S_IFREG else { throw SystemError(errno: ENOEXEC, call: "\(path) is not a regular file, so not a bzImage") }
        var head = [UInt8](repeating: 0, count: 64 << 10)
        let n = head.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
        guard n >= 0 else { throw SystemError.current("read", path: path) }
        return try release(header: Array(head[0..<n]), path: path)
    }

    static func release(header b: [UInt8], path: String) throws -> String {
        guard b.count >= 0x210, b[0x202] == 0x48, b[0x203] == 0x64, b[0x204] == 0x72, b[0x205] == 0x53 else {
            throw SystemError(errno: ENOEXEC, call: "\(path) is not a bzImage (no HdrS boot header)")
        }
        let at = Int(b[0x20E]) | Int(b[0x20F]) << 8
        let start = at + 0x200
        guard at != 0, start < b.count else { throw SystemError(errno: ENOEXEC, call: "\(path): the boot header names no kernel version") }
        let text = b[start...].prefix(256).prefix { $0 != 0 && $0 != 0x20 }
        guard !text.isEmpty else { throw SystemError(errno: ENOEXEC, call: "\(path): an empty kernel version") }
        return PeerText.decode(text)
    }
}

/// A kernel's modules, from /lib/modules/RELEASE/modules.dep.
enum KernelModules {
    struct Module: Equatable { let name: String; let path: String }

    /// Where a kernel's modules are: the host's /lib/modules/RELEASE, or — for a kernel unpacked
    /// from its package, DIR/boot/vmlinuz-RELEASE — DIR/lib/modules/RELEASE (with a modules.dep:
    /// scripts/guest-kernel runs depmod there). nil when neither has one.
    static func directory(release: String, kernel: String) -> String? {
        let system = "/lib/modules/\(release)"
        if ProcFile.exists("\(system)/modules.dep") { return system }
        var parts = kernel.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count >= 3 else { return nil }
        parts.removeLast(2)   // vmlinuz-RELEASE, boot
        let beside = parts.joined(separator: "/") + "/lib/modules/\(release)"
        return ProcFile.exists("\(beside)/modules.dep") ? beside : nil
    }

    /// The modules to load for `wanted`, dependencies first; one that is built in
    /// (modules.builtin) or missing is left out — then the guest says so on its console.
    static func loadOrder(directory: String?, wanted: [String]) -> [Module] {
        guard let dir = directory, let dep = try? ProcFile.read("\(dir)/modules.dep") else { return [] }
        return loadOrder(modulesDep: dep, directory: dir, wanted: wanted)
    }

    static func loadOrder(modulesDep: String, directory: String, wanted: [String]) -> [Module] {
        var deps: [String: [String]] = [:]
        for line in modulesDep.split(separator: "\n") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            let path = String(line[..<colon])
            deps[name(path)] = [path] + line[line.index(after: colon)...].split(separator: " ").map(String.init)
        }
        var order: [Module] = []
        func load(_ n: String, depth: Int) {
            guard depth < 32, !order.contains(where: { $0.name == n }), let entry = deps[n] else { return }
            // modules.dep lists each module's dependencies, nearest first: load them last-first.
            for d in entry.dropFirst().reversed() { load(name(d), depth: depth + 1) }
            order.append(Module(name: n, path: "\(directory)/\(entry[0])"))
        }
        for w in wanted { load(w, depth: 0) }
        return order
    }

    static func name(_ path: String) -> String {
        var n = path.split(separator: "/").last.map(String.init) ?? path
        for ext in [".ko.xz", ".ko.zst", ".ko.gz", ".ko"] where n.hasSuffix(ext) { n.removeLast(ext.count); break }
        return n
    }
}

/// A `newc` cpio archive in memory (the format the kernel unpacks an initramfs from).
struct CPIOWriter {
    private var out = Data()
    private var inode: UInt32 = 1

    private mutating func entry(_ name: String, mode: UInt32, body: Data) {
        // newc sizes are 32-bit: an input that large (no busybox, agent or module is) is cut
        // to nothing rather than trapping; the guest then says what is missing.
        let body = body.count <= Int(UInt32.max) ? body : Data()
        let nameBytes = Array(name.utf8) + [0]
        let fields: [UInt32] = [inode, mode, 0, 0, 1, 0, UInt32(body.count), 0, 0, 0, 0, UInt32(nameBytes.count), 0]
        inode += 1
        out.append(contentsOf: Array("070701".utf8))
        for f in fields { out.append(contentsOf: Array(String(format: "%08X", f).utf8)) }
        out.append(contentsOf: nameBytes)
        pad()
        out.append(body)
        pad()
    }

    private mutating func pad() { while out.count % 4 != 0 { out.append(0) } }

    mutating func directory(_ name: String) { entry(name, mode: 0o040755, body: Data()) }
    mutating func file(_ name: String, _ body: Data, mode: UInt32) { entry(name, mode: 0o100000 | mode, body: body) }

    mutating func finish() -> Data {
        entry("TRAILER!!!", mode: 0, body: Data())
        return out
    }
}
