#!/usr/bin/env bash
# Single-node Slurm 22.05 (Debian 12) + slurmdbd/MariaDB (real sacct) + 2 fake GPUs of two types (gpu:alpha:1, gpu:beta:1).
# Root, no systemd/cgroups. Prints SLURM READY when a job ran. Used by .ci/run for the tests marked `slurm`;
# running it again on a machine where the daemons already run leaves them running.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive; H=$(hostname -s); CPUS=$(nproc); MEM=$(( $(free -m | awk '/^Mem:/{print $2}') - 1024 ))
[ -e /usr/sbin/policy-rc.d ] || printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d # no autostart
if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null; then
  apt-get update -qq && apt-get install -y -qq slurmctld slurmd slurm-client munge slurmdbd mariadb-server >/dev/null
fi
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm; install -d -o munge -g munge /run/munge; install -d -o mysql -g mysql /run/mysqld
for i in 0 1; do [ -e /dev/fakegpu$i ] || mknod -m 666 /dev/fakegpu$i c 1 3; done   # fake device files (same dev as /dev/null)
C=/etc/slurm; printf '%s\n' ClusterName=ci SlurmctldHost=$H SlurmUser=root SlurmdUser=root AuthType=auth/munge CredType=cred/munge \
  MpiDefault=none MailProg=/bin/true ReturnToService=2 KillWait=5 StateSaveLocation=/var/spool/slurmctld SlurmdSpoolDir=/var/spool/slurmd \
  SlurmctldPidFile=/run/slurmctld.pid SlurmdPidFile=/run/slurmd.pid SlurmctldLogFile=/var/log/slurm/slurmctld.log \
  SlurmdLogFile=/var/log/slurm/slurmd.log ProctrackType=proctrack/linuxproc TaskPlugin=task/none JobCompType=jobcomp/none \
  JobAcctGatherType=jobacct_gather/none AccountingStorageType=accounting_storage/slurmdbd AccountingStorageHost=localhost \
  AccountingStorageTRES=gres/gpu,gres/gpu:alpha,gres/gpu:beta SchedulerType=sched/backfill SelectType=select/cons_tres \
  SelectTypeParameters=CR_Core_Memory DefMemPerCPU=1024 GresTypes=gpu SchedulerParameters=batch_sched_delay=0,sched_min_interval=0 \
  "NodeName=$H CPUs=$CPUS RealMemory=$MEM Gres=gpu:alpha:1,gpu:beta:1 State=UNKNOWN" \
  "PartitionName=debug Nodes=$H Default=YES MaxTime=INFINITE State=UP" > $C/slurm.conf  # one key per line (required)
printf 'AutoDetect=off\nNodeName=%s Name=gpu Type=alpha File=/dev/fakegpu0\nNodeName=%s Name=gpu Type=beta File=/dev/fakegpu1\n' "$H" "$H" > $C/gres.conf
printf '%s\n' AuthType=auth/munge DbdHost=localhost SlurmUser=root LogFile=/var/log/slurm/slurmdbd.log PidFile=/run/slurmdbd.pid \
  StorageType=accounting_storage/mysql StorageHost=localhost StorageUser=slurm StoragePass=slurmpw StorageLoc=slurm_acct_db > $C/slurmdbd.conf
chmod 600 /etc/slurm/slurmdbd.conf
pgrep -F /run/munge/munged.pid >/dev/null 2>&1 || runuser -u munge -- /usr/sbin/munged   # pid: /run/munge/munged.pid
pgrep -F /run/mysqld/mysqld.pid >/dev/null 2>&1 || { setsid /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid >/var/log/slurm/mariadb.log 2>&1 </dev/null & }
for i in $(seq 60); do mariadb-admin ping >/dev/null 2>&1 && break; sleep 0.5; done
mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db; CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
pgrep -F /run/slurmdbd.pid >/dev/null 2>&1 || slurmdbd; for i in $(seq 60); do (exec 3<>/dev/tcp/127.0.0.1/6819) 2>/dev/null && break; sleep 0.5; done
pgrep -F /run/slurmctld.pid >/dev/null 2>&1 || slurmctld; pgrep -F /run/slurmd.pid >/dev/null 2>&1 || slurmd
for i in $(seq 120); do [ "$(sinfo -h -N -o %T 2>/dev/null)" = idle ] && break; sleep 0.5; done
sinfo -N -o '%N %T %c %m %G'; [ "$(sinfo -h -N -o %T)" = idle ] && srun -N1 --gres=gpu:alpha:1 hostname >/dev/null && srun -N1 --gres=gpu:beta:1 hostname >/dev/null && echo SLURM READY
# stop (by PID): for f in /run/slurmd.pid /run/slurmctld.pid /run/slurmdbd.pid /run/mysqld/mysqld.pid /run/munge/munged.pid; do kill $(cat $f); done
