import ArgumentParser
import Foundation
import Guests
import LabKit
import LinuxMM

/// `memlab vm`: the guest image the vm scenarios boot, built here from distribution parts.
struct VM: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Real guests: build the image the vm scenarios boot (`memlab run vm:…` builds it on first use too).",
        subcommands: [Image.self])

    struct Image: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Build (or find) the guest initramfs: Debian's busybox, memlab's agent and the kernel's virtio modules.",
            discussion: """
            Nothing is downloaded: busybox comes from busybox-static, the kernel from linux-image-amd64 (or --kernel), \
            the agent is compiled from this repository's guest/agent.c. The image is cached in the state directory \
            ($MEMLAB_STATE_DIR/guests) under the hash of its contents and rebuilt when an input changes.
            """)

        @Option(help: "A bzImage (default: the newest /boot/vmlinuz-*).")
        var kernel: String?

        @Flag(help: "Print JSON.")
        var json = false

        func run() throws {
            if let why = GuestImage.missing {
                FileHandle.standardError.write(Data("memlab: cannot build a guest image here: \(why)\n".utf8))
                throw ExitCode(2)
            }
            let dir = "\(SettingsGuard.defaultStateDirectory)/guests"
            let image: GuestImage
            do {
                if let k = kernel { _ = try BzImage.release(of: k) }
                try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
                image = try GuestImage.build(directory: dir, kernel: kernel)
            } catch {
                FileHandle.standardError.write(Data("memlab: \(error)\n".utf8))
                throw ExitCode(2)
            }
            let size = (try? FileManager.default.attributesOfItem(atPath: image.path)[.size] as? Int) ?? 0
            if json {
                let o: [String: Any] = ["image": image.path, "kernel": image.kernel, "kernel_release": image.kernelRelease, "bytes": size]
                print(String(decoding: try JSONSerialization.data(withJSONObject: o, options: [.sortedKeys]), as: UTF8.self))
            } else {
                print("image   \(image.path) (\(size) bytes)")
                print("kernel  \(image.kernel) (\(image.kernelRelease))")
            }
        }
    }
}
