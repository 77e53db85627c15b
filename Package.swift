// swift-tools-version:6.0
import PackageDescription

// The scenarios' hot loops (touch, pointer chase, timed writes, the fault engine) are measured
// code: always optimised, also in debug builds, so a debug test run measures the kernel and
// not Swift's -Onone. `memlab bench` compares them with C.
let measured: [SwiftSetting] = [.unsafeFlags(["-O"])]

let package = Package(
    name: "memlab",
    products: [
        .executable(name: "memlab", targets: ["memlab"]),
        .library(name: "LinuxMM", targets: ["LinuxMM"]),
        .library(name: "LabKit", targets: ["LabKit"]),
        // libFuzzer targets (docs/reliability.md, "Fuzzing"); without -DFUZZING a replay driver.
        .executable(name: "memlab-fuzz", targets: ["MemlabFuzz"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/LebJe/TOMLKit", from: "0.6.0"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.2.0"),
    ],
    targets: [
        // Thin C wrappers for variadic calls (syscall, ioctl, prctl) and UAPI constants newer
        // than the installed headers. No logic lives here.
        .target(
            name: "CLinuxMM",
            // The C reference kernels are the yardstick of `memlab bench`: optimised always.
            cSettings: [.unsafeFlags(["-O2"])]
        ),
        // libnuma, from Debian's libnuma-dev.
        .systemLibrary(
            name: "CNUMA",
            pkgConfig: "numa",
            providers: [.apt(["libnuma-dev"])]
        ),
        // zstd, from Debian's libzstd-dev: migration's page compression (issue 14).
        .systemLibrary(
            name: "CZstd",
            pkgConfig: "libzstd",
            providers: [.apt(["libzstd-dev"])]
        ),
        .target(name: "LinuxMM", dependencies: ["CLinuxMM", "CNUMA"]),
        .target(
            name: "LabKit",
            dependencies: [
                "LinuxMM", "CLinuxMM",
                .product(name: "TOMLKit", package: "TOMLKit"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
            ]
        ),
        // What moves pages, for lazy restore and migration alike: the frame codec and sockets,
        // the image header, snapshot and checksum, the emulated link, and the userfaultfd
        // fault engine. Neither feature depends on the other; both stand on this.
        .target(name: "Transfer", dependencies: ["LinuxMM", "CLinuxMM"], swiftSettings: measured),
        // The measured loops every scenario shares (touch, pointer chase, fill patterns) and
        // `memlab bench`'s comparison of them with C.
        .target(name: "Workloads", dependencies: ["LinuxMM", "CLinuxMM"], swiftSettings: measured),
        .target(
            name: "LazyRestore",
            dependencies: ["Transfer", "Workloads", "LinuxMM", "LabKit", "CLinuxMM", .product(name: "Histogram", package: "hdrhistogram-swift")],
            swiftSettings: measured
        ),
        .target(
            name: "Migration",
            dependencies: ["Transfer", "Workloads", "LinuxMM", "LabKit", "CLinuxMM", "CZstd", .product(name: "Histogram", package: "hdrhistogram-swift")],
            swiftSettings: measured
        ),
        .target(
            name: "Scenarios",
            dependencies: [
                "LinuxMM", "LabKit", "CLinuxMM", "Transfer", "Workloads", "LazyRestore", "Migration", "Guests",
                .product(name: "Histogram", package: "hdrhistogram-swift"),
            ],
            swiftSettings: measured
        ),
        // Real guests (issue 13): QEMU processes under the runner's rules, and QMP.
        .target(name: "Guests", dependencies: ["LabKit", "LinuxMM", "CLinuxMM", "Transfer"]),
        // memlab re-executing itself (_child, _guest, _pagesource): hidden commands, in a
        // target of their own so memlab-fuzz parses their command lines as memlab does.
        .target(
            name: "EntryPoints",
            dependencies: [
                "LabKit", "Scenarios", "LazyRestore", "Workloads", "LinuxMM",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .executableTarget(
            name: "memlab",
            dependencies: [
                "LinuxMM", "LabKit", "Scenarios", "EntryPoints", "CLinuxMM", "Transfer", "Workloads", "LazyRestore", "Migration", "Guests",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .executableTarget(name: "MemlabFuzz", dependencies: ["LinuxMM", "LabKit", "Scenarios", "EntryPoints", "Transfer", "Workloads", "LazyRestore", "Migration", "Guests"]),
        .testTarget(name: "LinuxMMTests", dependencies: ["LinuxMM"]),
        .testTarget(name: "TransferTests", dependencies: ["Transfer", "LazyRestore", "LinuxMM"]),
        .testTarget(name: "LabKitTests", dependencies: ["LabKit", "LinuxMM", .product(name: "Histogram", package: "hdrhistogram-swift")]),
        .testTarget(
            name: "MemlabTests",
            dependencies: [
                "LabKit", "LinuxMM", "Scenarios", "EntryPoints", "Guests", "Migration", "CLinuxMM", "memlab",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
    ]
)
