# Keystone guest image, the Nix way: a NixOS configuration with the same
# contract as the Debian builder (guest-image/debian): kernel, initrd, a
# read-only ext4 base filesystem, the kernel command line and component
# versions. `keystone image build` runs `nix build <this dir>#image` when
# Nix is installed and writes manifest.json from the result.
#
# Only parse-checked on Keystone's own CI machines (`nix-instantiate
# --parse`): they have no Nix store and no nixpkgs. NixOS kernels already
# have CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES; virtio drivers load from the initrd.
{
  description = "Keystone sandbox guest image (NixOS)";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.11";

  outputs = { self, nixpkgs }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
      rootfs = ./rootfs;
      keystoneScripts = pkgs.runCommand "keystone-guest-scripts" { } ''
        mkdir -p $out/lib/keystone
        cp ${rootfs}/usr/lib/keystone/{setup,ready,notify-commit,egress-bridge} $out/lib/keystone/
        chmod +x $out/lib/keystone/*
        patchShebangs $out/lib/keystone
      '';

      nixos = nixpkgs.lib.nixosSystem {
        inherit system;
        modules = [
          ({ config, lib, pkgs, modulesPath, ... }: {
            imports = [ "${modulesPath}/profiles/minimal.nix" ];
            system.stateVersion = "24.11";
            boot.loader.grub.enable = false;
            boot.kernelPackages = pkgs.linuxPackages_6_1;
            boot.kernelParams = [
              "console=ttyS0" "reboot=k" "panic=1" "pci=off" "acpi=off" "nomodule"
              "i8042.noaux" "i8042.nomux" "i8042.nopnp" "i8042.dumbkbd" "quiet"
            ];
            boot.initrd.availableKernelModules = [ "virtio_mmio" "virtio_blk" "ext4" "overlay" ];
            boot.kernelModules = [ "virtio_net" "vmw_vsock_virtio_transport" ];
            # Same layout as the Debian image: the shared base read-only,
            # the sandbox disk (/dev/vdb) holds the overlay's upper layer.
            fileSystems."/" = { device = "/dev/vda"; fsType = "ext4"; options = [ "ro" ]; };
            boot.initrd.postMountCommands = ''
              mkdir -p /mnt-base /mnt-data
              mount --move /mnt-root /mnt-base
              if ! mount -t ext4 /dev/vdb /mnt-data; then mount -t tmpfs tmpfs /mnt-data; fi
              mkdir -p /mnt-data/upper /mnt-data/work
              mount -t overlay overlay -o lowerdir=/mnt-base,upperdir=/mnt-data/upper,workdir=/mnt-data/work /mnt-root
            '';
            networking.hostName = "keystone";
            networking.useNetworkd = true;
            systemd.network.wait-online.enable = false;
            users.users.sandbox = {
              isNormalUser = true;
              uid = 1000;
              extraGroups = [ "wheel" ];
              hashedPassword = "*";
            };
            security.sudo.wheelNeedsPassword = false;
            environment.systemPackages = with pkgs; [ git python3 vim curl wget htop cacert socat ];
            environment.etc."gitconfig".source = "${rootfs}/etc/gitconfig";
            services.openssh = {
              enable = true;
              openFirewall = false;
              listenAddresses = [ ];
              settings = {
                PasswordAuthentication = false;
                KbdInteractiveAuthentication = false;
                PermitRootLogin = "no";
                AllowUsers = [ "sandbox" ];
              };
              authorizedKeysFiles = [ "/run/keystone/authorized_keys" ];
              # Per boot, from keystone-setup (the egress proxy's variables).
              extraConfig = "Include /run/keystone/sshd_config.d/*.conf";
            };
            systemd.services.sshd.enable = lib.mkForce false;
            systemd.services.keystone-setup = {
              wantedBy = [ "sysinit.target" ];
              before = [ "sysinit.target" "keystone-sshd.socket" ];
              after = [ "local-fs.target" ];
              unitConfig.DefaultDependencies = false;
              path = with pkgs; [ coreutils gnused openssh nettools ];
              serviceConfig = { Type = "oneshot"; RemainAfterExit = true; ExecStart = "${keystoneScripts}/lib/keystone/setup"; };
            };
            systemd.sockets.keystone-sshd = {
              wantedBy = [ "sockets.target" ];
              after = [ "keystone-setup.service" ];
              requires = [ "keystone-setup.service" ];
              listenStreams = [ "vsock::22" ];
              socketConfig.Accept = true;
            };
            systemd.services."keystone-sshd@" = {
              serviceConfig = {
                ExecStart = "-${config.services.openssh.package}/bin/sshd -i -f /etc/ssh/sshd_config";
                StandardInput = "socket";
                RuntimeDirectory = "sshd";
                RuntimeDirectoryPreserve = true;
              };
            };
            systemd.services.keystone-ready = {
              wantedBy = [ "multi-user.target" ];
              after = [ "keystone-sshd.socket" "keystone-setup.service" ];
              requires = [ "keystone-sshd.socket" ];
              serviceConfig = { Type = "oneshot"; RemainAfterExit = true; ExecStart = "${pkgs.python3}/bin/python3 ${keystoneScripts}/lib/keystone/ready"; };
            };
            # --network policy: 127.0.0.1:3128 to the host's egress proxy.
            systemd.sockets.keystone-egress = {
              wantedBy = [ "sockets.target" ];
              unitConfig.ConditionKernelCommandLine = "keystone.egress";
              listenStreams = [ "127.0.0.1:3128" ];
              socketConfig = { Accept = true; MaxConnections = 256; };
            };
            systemd.services."keystone-egress@" = {
              path = with pkgs; [ coreutils gnused socat ];
              serviceConfig = {
                ExecStart = "${keystoneScripts}/lib/keystone/egress-bridge";
                StandardInput = "socket";
                StandardOutput = "socket";
                StandardError = "journal";
                DynamicUser = true;
              };
            };
            systemd.services."serial-getty@".unitConfig.ConditionKernelCommandLine = "keystone.debug";
          })
        ];
      };
      cfg = nixos.config;
      rootImage = import "${nixpkgs}/nixos/lib/make-disk-image.nix" {
        inherit pkgs;
        inherit (nixpkgs) lib;
        config = cfg;
        format = "raw";
        partitionTableType = "none";
        fsType = "ext4";
        label = "keystone-base";
        diskSize = "auto";
        additionalSpace = "256M";
        copyChannel = false;
      };
    in {
      nixosConfigurations.keystone = nixos;
      packages.${system} = {
        image = pkgs.runCommand "keystone-guest-image" { } ''
          mkdir -p $out
          cp ${cfg.boot.kernelPackages.kernel}/bzImage $out/bzImage
          cp ${cfg.system.build.initialRamdisk}/${cfg.system.boot.loader.initrdFile} $out/initrd
          cp ${rootImage}/nixos.img $out/rootfs.ext4
          echo "${toString cfg.boot.kernelParams} root=/dev/vda init=${cfg.system.build.toplevel}/init" > $out/cmdline
          {
            echo "nixos=${cfg.system.nixos.label}"
            echo "kernel=${cfg.boot.kernelPackages.kernel.version}"
            echo "systemd=${cfg.systemd.package.version}"
            echo "openssh-server=${cfg.services.openssh.package.version}"
            echo "git=${pkgs.git.version}"
            echo "python3=${pkgs.python3.version}"
          } > $out/versions
        '';
        default = self.packages.${system}.image;
      };
    };
}
