package service

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/goccy/go-yaml"

	"github.com/node-mirror/node-mirror/pkg/config"
	"github.com/node-mirror/node-mirror/pkg/hosts"
)

// The subset of the Kubernetes schema examples/daemonset.yaml uses. Decoding rejects
// unknown fields, so a misspelt key (readinessprobe, hostnetwork) fails the test instead of
// being silently ignored by this test and then rejected or ignored by the API server.
type manifest struct {
	APIVersion string            `yaml:"apiVersion"`
	Kind       string            `yaml:"kind"`
	Metadata   objectMeta        `yaml:"metadata"`
	Spec       *daemonSetSpec    `yaml:"spec"`
	Data       map[string]string `yaml:"data"`
}

type objectMeta struct {
	Name      string            `yaml:"name"`
	Namespace string            `yaml:"namespace"`
	Labels    map[string]string `yaml:"labels"`
}

type daemonSetSpec struct {
	Selector struct {
		MatchLabels map[string]string `yaml:"matchLabels"`
	} `yaml:"selector"`
	UpdateStrategy struct {
		Type          string `yaml:"type"`
		RollingUpdate struct {
			MaxUnavailable any `yaml:"maxUnavailable"`
		} `yaml:"rollingUpdate"`
	} `yaml:"updateStrategy"`
	Template struct {
		Metadata objectMeta `yaml:"metadata"`
		Spec     podSpec    `yaml:"spec"`
	} `yaml:"template"`
}

type podSpec struct {
	HostNetwork                   bool             `yaml:"hostNetwork"`
	DNSPolicy                     string           `yaml:"dnsPolicy"`
	PriorityClassName             string           `yaml:"priorityClassName"`
	Tolerations                   []map[string]any `yaml:"tolerations"`
	AutomountServiceAccountToken  *bool            `yaml:"automountServiceAccountToken"`
	EnableServiceLinks            *bool            `yaml:"enableServiceLinks"`
	TerminationGracePeriodSeconds int              `yaml:"terminationGracePeriodSeconds"`
	InitContainers                []container      `yaml:"initContainers"`
	Containers                    []container      `yaml:"containers"`
	Volumes                       []volume         `yaml:"volumes"`
}

type container struct {
	Name            string   `yaml:"name"`
	Image           string   `yaml:"image"`
	ImagePullPolicy string   `yaml:"imagePullPolicy"`
	Command         []string `yaml:"command"`
	Args            []string `yaml:"args"`
	Env             []struct {
		Name      string `yaml:"name"`
		Value     string `yaml:"value"`
		ValueFrom *struct {
			FieldRef *struct {
				FieldPath string `yaml:"fieldPath"`
			} `yaml:"fieldRef"`
			ResourceFieldRef *struct {
				Resource string `yaml:"resource"`
			} `yaml:"resourceFieldRef"`
		} `yaml:"valueFrom"`
	} `yaml:"env"`
	Ports []struct {
		Name          string `yaml:"name"`
		ContainerPort int    `yaml:"containerPort"`
		Protocol      string `yaml:"protocol"`
	} `yaml:"ports"`
	ReadinessProbe *probe `yaml:"readinessProbe"`
	LivenessProbe  *probe `yaml:"livenessProbe"`
	Resources      struct {
		Requests map[string]string `yaml:"requests"`
		Limits   map[string]string `yaml:"limits"`
	} `yaml:"resources"`
	SecurityContext *struct {
		RunAsUser                *int64 `yaml:"runAsUser"`
		RunAsGroup               *int64 `yaml:"runAsGroup"`
		AllowPrivilegeEscalation *bool  `yaml:"allowPrivilegeEscalation"`
		ReadOnlyRootFilesystem   bool   `yaml:"readOnlyRootFilesystem"`
		Privileged               bool   `yaml:"privileged"`
		Capabilities             struct {
			Add  []string `yaml:"add"`
			Drop []string `yaml:"drop"`
		} `yaml:"capabilities"`
		SeccompProfile struct {
			Type string `yaml:"type"`
		} `yaml:"seccompProfile"`
	} `yaml:"securityContext"`
	VolumeMounts []struct {
		Name      string `yaml:"name"`
		MountPath string `yaml:"mountPath"`
		ReadOnly  bool   `yaml:"readOnly"`
	} `yaml:"volumeMounts"`
}

type probe struct {
	HTTPGet *struct {
		Host string `yaml:"host"`
		Port int    `yaml:"port"`
		Path string `yaml:"path"`
	} `yaml:"httpGet"`
	InitialDelaySeconds int `yaml:"initialDelaySeconds"`
	PeriodSeconds       int `yaml:"periodSeconds"`
	TimeoutSeconds      int `yaml:"timeoutSeconds"`
	FailureThreshold    int `yaml:"failureThreshold"`
}

type volume struct {
	Name     string `yaml:"name"`
	HostPath *struct {
		Path string `yaml:"path"`
		Type string `yaml:"type"`
	} `yaml:"hostPath"`
	ConfigMap *struct {
		Name string `yaml:"name"`
	} `yaml:"configMap"`
	EmptyDir *struct {
		SizeLimit string `yaml:"sizeLimit"`
	} `yaml:"emptyDir"`
}

type example struct {
	ds        manifest
	configMap manifest
}

func loadDaemonSet(t *testing.T) example {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot(t), "examples/daemonset.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(b), yaml.DisallowUnknownField())
	var ex example
	for {
		var m manifest
		err := dec.Decode(&m)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("examples/daemonset.yaml: %v", err)
		}
		switch m.Kind {
		case "DaemonSet":
			ex.ds = m
		case "ConfigMap":
			ex.configMap = m
		default:
			t.Errorf("examples/daemonset.yaml: unexpected kind %q", m.Kind)
		}
	}
	if ex.ds.Kind == "" || ex.ds.Spec == nil {
		t.Fatal("examples/daemonset.yaml has no DaemonSet")
	}
	return ex
}

func (m manifest) pod() *podSpec { return &m.Spec.Template.Spec }

func (p *podSpec) volume(name string) *volume {
	for i := range p.Volumes {
		if p.Volumes[i].Name == name {
			return &p.Volumes[i]
		}
	}
	return nil
}

// mountOf is the volume mounted at path in c.
func (p *podSpec) mountOf(c container, path string) *volume {
	for _, m := range c.VolumeMounts {
		if m.MountPath == path {
			return p.volume(m.Name)
		}
	}
	return nil
}

// flagValue is the value following flag in argv.
func flagValue(argv []string, flag string) string {
	if i := slices.Index(argv, flag); i >= 0 && i+1 < len(argv) {
		return argv[i+1]
	}
	return ""
}

func TestDaemonSetExample(t *testing.T) {
	ex := loadDaemonSet(t)
	ds := ex.ds
	if ds.APIVersion != "apps/v1" || ds.Kind != "DaemonSet" {
		t.Errorf("apiVersion/kind = %s/%s, want apps/v1 DaemonSet", ds.APIVersion, ds.Kind)
	}
	for k, v := range ds.Spec.Selector.MatchLabels {
		if ds.Spec.Template.Metadata.Labels[k] != v {
			t.Errorf("selector %s=%s does not match the pod template's labels", k, v)
		}
	}
	if len(ds.Spec.Selector.MatchLabels) == 0 {
		t.Error("no selector")
	}
	pod := ds.pod()
	if !pod.HostNetwork {
		t.Error("hostNetwork is not true: containerd on the node could not reach the mirror on 127.0.0.1")
	}

	// Volumes: the node's /etc and a hostPath data dir; every mount names a volume.
	if v := pod.volume("host-etc"); v == nil || v.HostPath == nil || v.HostPath.Path != "/etc" {
		t.Error("no hostPath volume host-etc for the node's /etc")
	}
	data := pod.volume("data")
	if data == nil || data.HostPath == nil || data.HostPath.Path != "/var/lib/node-mirror" || data.HostPath.Type != "DirectoryOrCreate" {
		t.Fatal("no hostPath volume data at /var/lib/node-mirror (DirectoryOrCreate)")
	}
	for _, c := range append(slices.Clone(pod.InitContainers), pod.Containers...) {
		for _, m := range c.VolumeMounts {
			if pod.volume(m.Name) == nil {
				t.Errorf("%s mounts volume %q, which is not defined", c.Name, m.Name)
			}
		}
	}

	if len(pod.InitContainers) != 1 || len(pod.Containers) != 1 {
		t.Fatalf("want one init container and one container, have %d and %d", len(pod.InitContainers), len(pod.Containers))
	}
	initC, main := pod.InitContainers[0], pod.Containers[0]

	// The init container: node-mirror install against the node's files, with flags install has.
	argv := append(slices.Clone(initC.Command), initC.Args...)
	if len(argv) < 2 || filepath.Base(argv[0]) != "node-mirror" || argv[1] != "install" {
		t.Fatalf("init container runs %q, want node-mirror install …", argv)
	}
	root := flagValue(argv, "--root")
	if root == "" || root == "/" {
		t.Fatalf("init container %q: --root must name where the node's / is mounted", argv)
	}
	if v := pod.mountOf(initC, root+"/etc"); v == nil || v.Name != "host-etc" {
		t.Errorf("init container: %s/etc is not the node's /etc", root)
	}
	// install records its changes in the node's StatePath, so uninstall can run later.
	if v := pod.mountOf(initC, root+filepath.Dir(hosts.StatePath)); v == nil || v.HostPath == nil || v.HostPath.Path != filepath.Dir(hosts.StatePath) {
		t.Errorf("init container: %s%s is not the node's %s, so install's state would be lost", root, filepath.Dir(hosts.StatePath), filepath.Dir(hosts.StatePath))
	}
	// That record decides what uninstall writes as root; the mirror runs as root too, so
	// it must not see the record's directory (nor one above it) at all.
	for _, c := range pod.Containers {
		for _, m := range c.VolumeMounts {
			if v := pod.volume(m.Name); v != nil && v.HostPath != nil &&
				(v.HostPath.Path == "/" || strings.HasPrefix(hosts.StatePath, strings.TrimSuffix(v.HostPath.Path, "/")+"/")) {
				t.Errorf("container %s mounts the node's %s, where install keeps its state", c.Name, v.HostPath.Path)
			}
		}
	}
	checkFlags(t, "install", argv)

	// The main container: serve on loopback, data on the hostPath.
	argv = append(slices.Clone(main.Command), main.Args...)
	if len(argv) < 2 || filepath.Base(argv[0]) != "node-mirror" || argv[1] != "serve" {
		t.Fatalf("container runs %q, want node-mirror serve …", argv)
	}
	checkFlags(t, "serve", argv)
	listen := flagValue(argv, "--listen")
	host, port, err := net.SplitHostPort(listen)
	if err != nil || !net.ParseIP(host).IsLoopback() {
		t.Errorf("--listen %q: want a loopback address", listen)
	}
	if v := pod.mountOf(main, flagValue(argv, "--data-dir")); v == nil || v.Name != "data" {
		t.Errorf("--data-dir %q is not the data hostPath", flagValue(argv, "--data-dir"))
	}
	// install's --mirror-url is where serve listens.
	if got := flagValue(append(slices.Clone(initC.Command), initC.Args...), "--mirror-url"); got != "http://"+listen {
		t.Errorf("install --mirror-url %q, but serve listens on %s", got, listen)
	}

	// Probes: kubelet shares the node's network namespace with a hostNetwork pod, so it
	// reaches the loopback listener only when the probe names host 127.0.0.1.
	for _, p := range []struct {
		name  string
		probe *probe
		path  string
	}{{"readinessProbe", main.ReadinessProbe, "/readyz"}, {"livenessProbe", main.LivenessProbe, "/healthz"}} {
		if p.probe == nil || p.probe.HTTPGet == nil {
			t.Errorf("%s: want an httpGet probe", p.name)
			continue
		}
		g := p.probe.HTTPGet
		if g.Path != p.path || g.Host != host || strconv.Itoa(g.Port) != port {
			t.Errorf("%s: http://%s:%d%s, want http://%s%s", p.name, g.Host, g.Port, g.Path, listen, p.path)
		}
	}

	// Resources and security context on every container.
	for _, c := range append(slices.Clone(pod.InitContainers), pod.Containers...) {
		for _, r := range []string{"cpu", "memory"} {
			if c.Resources.Requests[r] == "" || c.Resources.Limits[r] == "" {
				t.Errorf("%s: resources.requests and .limits must set %s", c.Name, r)
			}
		}
		sc := c.SecurityContext
		if sc == nil || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation ||
			!slices.Contains(sc.Capabilities.Drop, "ALL") || len(sc.Capabilities.Add) > 0 || sc.Privileged ||
			!sc.ReadOnlyRootFilesystem || sc.SeccompProfile.Type != "RuntimeDefault" {
			t.Errorf("%s: securityContext must drop ALL capabilities, forbid privilege escalation, "+
				"mount the root read-only and use the RuntimeDefault seccomp profile", c.Name)
		}
	}

	// The ConfigMap's config is one the mirror accepts, with the same listen address.
	cm := ex.configMap
	if cm.Metadata.Name == "" {
		t.Fatal("no ConfigMap with the mirror's config")
	}
	if v := pod.volume("config"); v == nil || v.ConfigMap == nil || v.ConfigMap.Name != cm.Metadata.Name || cm.Metadata.Namespace != ds.Metadata.Namespace {
		t.Errorf("the config volume does not name the ConfigMap %s/%s", cm.Metadata.Namespace, cm.Metadata.Name)
	}
	f := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(f, []byte(cm.Data["config.toml"]), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(f)
	if err != nil {
		t.Fatalf("the ConfigMap's config.toml: %v", err)
	}
	if cfg.Listen != listen {
		t.Errorf("the ConfigMap's listen %q differs from --listen %q", cfg.Listen, listen)
	}
}

// checkFlags fails for every --flag in argv that `node-mirror <cmd> --help` does not list.
func checkFlags(t *testing.T, cmd string, argv []string) {
	t.Helper()
	help := helpOf(t, cmd)
	for _, a := range argv[2:] {
		if strings.HasPrefix(a, "--") && !strings.Contains(help, a+" ") {
			t.Errorf("%s flag %s is not in `node-mirror %s --help`", cmd, a, cmd)
		}
	}
}

// TestDaemonSetRuns runs the example's two commands as kubelet would, with the node's
// filesystem under a temporary directory, loopback ports of our own and, as root, no
// capabilities (the securityContext drops ALL): install writes
// containerd's hosts.toml files on the "node", serve answers the probes, and uninstall
// (from the node's side) restores the node.
func TestDaemonSetRuns(t *testing.T) {
	ex := loadDaemonSet(t)
	pod := ex.ds.pod()
	initC, main := pod.InitContainers[0], pod.Containers[0]
	node := t.TempDir() // the node's /

	// A node whose containerd already reads /etc/containerd/certs.d (kubeadm, kind with the
	// patch in docs/service.md): hosts.toml files take effect without a restart.
	cdConf := filepath.Join(node, "etc/containerd/config.toml")
	if err := os.MkdirAll(filepath.Dir(cdConf), 0o755); err != nil {
		t.Fatal(err)
	}
	cd := "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n"
	if err := os.WriteFile(cdConf, []byte(cd), 0o644); err != nil {
		t.Fatal(err)
	}

	// Volumes as kubelet provides them: hostPaths below node, the rest in temp dirs.
	vols := map[string]string{}
	for _, v := range pod.Volumes {
		switch {
		case v.HostPath != nil:
			vols[v.Name] = filepath.Join(node, v.HostPath.Path)
			if err := os.MkdirAll(vols[v.Name], 0o755); err != nil {
				t.Fatal(err)
			}
		case v.ConfigMap != nil:
			vols[v.Name] = t.TempDir()
			for k, data := range ex.configMap.Data {
				if err := os.WriteFile(filepath.Join(vols[v.Name], k), []byte(data), 0o644); err != nil {
					t.Fatal(err)
				}
			}
		default:
			vols[v.Name] = t.TempDir()
		}
	}

	// The daemon listens on port 0 where the example says 5000 (listen) and 9500
	// (metrics), and tells which ports it bound; the init container writes the example's
	// URL into files, which nothing here dials.
	ports := map[string]string{}

	// rewrite maps an argument from the container's view to ours.
	rewrite := func(c container, env map[string]string, a string) string {
		for k, v := range env {
			a = strings.ReplaceAll(a, "$("+k+")", v)
		}
		// Longest mount path first.
		mounts := slices.Clone(c.VolumeMounts)
		sort.Slice(mounts, func(i, j int) bool { return len(mounts[i].MountPath) > len(mounts[j].MountPath) })
		for _, m := range mounts {
			if a == m.MountPath || strings.HasPrefix(a, m.MountPath+"/") {
				return vols[m.Name] + strings.TrimPrefix(a, m.MountPath)
			}
		}
		for from, to := range ports {
			a = strings.ReplaceAll(a, ":"+from, ":"+to)
		}
		return a
	}

	// The init container.
	argv := append(slices.Clone(initC.Command), initC.Args...)
	args := []string{}
	for i, a := range argv[1:] {
		if argv[i] == "--root" {
			args = append(args, node) // its mounts below --root are the node's paths (checked above)
			continue
		}
		args = append(args, rewrite(initC, nil, a))
	}
	out, err := asContainer(t, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("init container: node-mirror %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	mirrorURL := flagValue(argv, "--mirror-url")
	for _, reg := range []string{"docker.io", "registry.k8s.io"} {
		h, err := os.ReadFile(filepath.Join(node, "etc/containerd/certs.d", reg, "hosts.toml"))
		if err != nil || !bytes.Contains(h, []byte(mirrorURL)) {
			t.Errorf("init container did not point the node's containerd at %s for %s: %v\n%s\n%s", mirrorURL, reg, err, h, out)
		}
	}
	if _, err := os.Stat(filepath.Join(node, hosts.StatePath)); err != nil {
		t.Errorf("install left no state on the node: %v", err)
	}

	// The main container.
	ports = map[string]string{"5000": "0", "9500": "0"}
	env := map[string]string{}
	for _, e := range main.Env {
		switch {
		case e.ValueFrom == nil:
			env[e.Name] = e.Value
		case e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "status.hostIP":
			env[e.Name] = "127.0.0.1" // the node IP; loopback here
		case e.ValueFrom.ResourceFieldRef != nil && e.ValueFrom.ResourceFieldRef.Resource == "limits.memory":
			env[e.Name] = strconv.FormatInt(quantityBytes(t, main.Resources.Limits["memory"]), 10)
		default:
			t.Fatalf("env %s: unsupported valueFrom", e.Name)
		}
	}
	argv = append(slices.Clone(main.Command), main.Args...)
	args = nil
	for _, a := range argv[1:] {
		args = append(args, rewrite(main, env, a))
	}
	ready := filepath.Join(t.TempDir(), "ready")
	args = append(args, "--ready-file", ready)
	cmd := asContainer(t, args...)
	cmd.Env = os.Environ()
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	d := startDaemon(t, cmd)
	_, ports["5000"], _ = net.SplitHostPort(d.readyAddr(t, ready, 30*time.Second))
	_, ports["9500"], _ = net.SplitHostPort(d.loggedAddr(t, "serving metrics-listen", 10*time.Second))
	probeURL := func(p *probe) string {
		return fmt.Sprintf("http://%s:%s%s", p.HTTPGet.Host, ports[strconv.Itoa(p.HTTPGet.Port)], p.HTTPGet.Path)
	}
	waitStatus(t, probeURL(main.ReadinessProbe), http.StatusOK, 30*time.Second)
	waitStatus(t, probeURL(main.LivenessProbe), http.StatusOK, 5*time.Second)
	for _, p := range main.Ports {
		if p.Name == "metrics" {
			waitStatus(t, fmt.Sprintf("http://127.0.0.1:%s/metrics", ports[strconv.Itoa(p.ContainerPort)]), http.StatusOK, 5*time.Second)
		}
	}
	d.stop(t)

	// On the node: uninstall puts containerd's files back.
	if out, err := exec.Command(nodeMirrorBin, "uninstall", "--root", node).CombinedOutput(); err != nil {
		t.Fatalf("uninstall: %v\n%s", err, out)
	}
	if _, err := os.Stat(filepath.Join(node, "etc/containerd/certs.d/docker.io/hosts.toml")); !os.IsNotExist(err) {
		t.Errorf("uninstall left docker.io's hosts.toml: %v", err)
	}
	if b, _ := os.ReadFile(cdConf); string(b) != cd {
		t.Errorf("uninstall did not restore %s:\n%s", cdConf, b)
	}
}

// asContainer runs node-mirror as the example's securityContext does: as root (when the
// test is), with every capability dropped and no_new_privs.
func asContainer(t *testing.T, args ...string) *exec.Cmd {
	t.Helper()
	if os.Geteuid() != 0 {
		return exec.Command(nodeMirrorBin, args...)
	}
	setpriv := needTool(t, "setpriv", "util-linux")
	return exec.Command(setpriv, append([]string{"--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--", nodeMirrorBin}, args...)...)
}

// quantityBytes reads a Kubernetes memory quantity such as 512Mi.
func quantityBytes(t *testing.T, q string) int64 {
	t.Helper()
	for suffix, mult := range map[string]int64{"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30} {
		if n, ok := strings.CutSuffix(q, suffix); ok {
			v, err := strconv.ParseInt(n, 10, 64)
			if err != nil {
				t.Fatalf("quantity %q: %v", q, err)
			}
			return v * mult
		}
	}
	v, err := strconv.ParseInt(q, 10, 64)
	if err != nil {
		t.Fatalf("quantity %q: %v", q, err)
	}
	return v
}
