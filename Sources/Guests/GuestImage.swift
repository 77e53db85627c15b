#if canImport(Glibc)
import Glibc
#endif
import Foundation
import LinuxMM

/// A guest's initramfs, built by memlab from distribution parts and nothing downloaded:
/// Debian's static busybox and an `/init` script, written as an uncompressed `newc` cpio
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
        return nil
    }

    /// The line `/init` prints on the serial console once the guest is up.
    public static let readyMarker = "memlab-guest: ready"

    public let path: String
    public let kernel: String

    /// Builds (or finds) the image in `directory`: busybox and an init that mounts /proc and
    /// /sys, prints the ready line with the guest's uptime, then runs `then` (a shell line;
    /// default: power off).
    public static func build(directory: String, kernel: String? = nil, then: String = "/bin/busybox poweroff -f") throws -> GuestImage {
        guard let kernel = kernel ?? distributionKernel else { throw SystemError(errno: ENOENT, call: "find a kernel in /boot") }
        let busyboxBytes = try Data(contentsOf: URL(fileURLWithPath: busybox))
        let initScript = """
        #!/bin/busybox sh
        /bin/busybox mount -t proc proc /proc
        /bin/busybox mount -t sysfs sys /sys
        /bin/busybox echo "\(readyMarker) uptime $(/bin/busybox cut -d' ' -f1 /proc/uptime)"
        \(then)
        """
        var archive = CPIOWriter()
        for dir in ["bin", "proc", "sys", "dev", "tmp"] { archive.directory(dir) }
        archive.file("bin/busybox", busyboxBytes, mode: 0o755)
        archive.file("init", Data(initScript.utf8), mode: 0o755)
        let data = archive.finish()
        // FNV-1a of the archive: the cache key (a changed busybox or init makes a new name).
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in data { h ^= UInt64(b); h &*= 0x0000_0100_0000_01b3 }
        let path = "\(directory)/guest-\(String(h, radix: 16)).cpio"
        if !ProcFile.exists(path) { try AtomicFile.write(Array(data), to: path) }
        return GuestImage(path: path, kernel: kernel)
    }
}

/// A `newc` cpio archive in memory (the format the kernel unpacks an initramfs from).
struct CPIOWriter {
    private var out = Data()
    private var inode: UInt32 = 1

    private mutating func entry(_ name: String, mode: UInt32, body: Data) {
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
