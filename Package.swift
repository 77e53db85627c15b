// swift-tools-version:6.0
import PackageDescription

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
        .target(name: "LinuxMM", dependencies: ["CLinuxMM", "CNUMA"]),
        .target(
            name: "LabKit",
            dependencies: [
                "LinuxMM", "CLinuxMM",
                .product(name: "TOMLKit", package: "TOMLKit"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
            ]
        ),
        .target(
            name: "Scenarios",
            dependencies: [
                "LinuxMM", "LabKit", "CLinuxMM",
                .product(name: "Histogram", package: "hdrhistogram-swift"),
            ],
            // The scenarios' hot loops (touch, pointer chase, timed writes) are measured code:
            // always optimised, also in debug builds, so a debug test run measures the kernel
            // and not Swift's -Onone. `memlab bench` compares them with C.
            swiftSettings: [.unsafeFlags(["-O"])]
        ),
        // memlab re-executing itself (_child, _guest, _pagesource): hidden commands, in a
        // target of their own so memlab-fuzz parses their command lines as memlab does.
        .target(
            name: "EntryPoints",
            dependencies: [
                "LabKit", "Scenarios",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .executableTarget(
            name: "memlab",
            dependencies: [
                "LinuxMM", "LabKit", "Scenarios", "EntryPoints", "CLinuxMM",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .executableTarget(name: "MemlabFuzz", dependencies: ["LinuxMM", "LabKit", "Scenarios", "EntryPoints"]),
        .testTarget(name: "LinuxMMTests", dependencies: ["LinuxMM"]),
        .testTarget(name: "LabKitTests", dependencies: ["LabKit", "LinuxMM", .product(name: "Histogram", package: "hdrhistogram-swift")]),
        .testTarget(
            name: "MemlabTests",
            dependencies: [
                "LabKit", "LinuxMM", "Scenarios", "EntryPoints", "memlab",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
    ]
)
