package service

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/goccy/go-yaml"

	"github.com/node-mirror/node-mirror/internal/testenv"
	"github.com/node-mirror/node-mirror/pkg/config"
	"github.com/node-mirror/node-mirror/pkg/hosts"
)

// The subset of the Kubernetes schema examples/daemonset.yaml and
// examples/daemonset-fleet.yaml use. Decoding rejects unknown fields, so a misspelt key
// (readinessprobe, hostnetwork) fails the test instead of being silently ignored by this
// test and then rejected or ignored by the API server.
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

// serviceManifest is a Service: the fleet's headless Service.
type serviceManifest struct {
	APIVersion string     `yaml:"apiVersion"`
	Kind       string     `yaml:"kind"`
	Metadata   objectMeta `yaml:"metadata"`
	Spec       struct {
		ClusterIP                string            `yaml:"clusterIP"`
		PublishNotReadyAddresses bool              `yaml:"publishNotReadyAddresses"`
		Selector                 map[string]string `yaml:"selector"`
		Ports                    []struct {
			Name     string `yaml:"name"`
			Port     int    `yaml:"port"`
			Protocol string `yaml:"protocol"`
		} `yaml:"ports"`
	} `yaml:"spec"`
}

type podSpec struct {
	// SecurityContext is decoded so that an fsGroup, which would make the fleet key
	// group-readable, is seen.
	SecurityContext *struct {
		FSGroup            *int64  `yaml:"fsGroup"`
		SupplementalGroups []int64 `yaml:"supplementalGroups"`
	} `yaml:"securityContext"`
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
			SecretKeyRef *struct {
				Name string `yaml:"name"`
				Key  string `yaml:"key"`
			} `yaml:"secretKeyRef"`
		} `yaml:"valueFrom"`
	} `yaml:"env"`
	EnvFrom []struct {
		SecretRef *struct {
			Name string `yaml:"name"`
		} `yaml:"secretRef"`
		ConfigMapRef *struct {
			Name string `yaml:"name"`
		} `yaml:"configMapRef"`
	} `yaml:"envFrom"`
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
	Secret *struct {
		SecretName  string `yaml:"secretName"`
		DefaultMode *int   `yaml:"defaultMode"`
	} `yaml:"secret"`
}

type example struct {
	ds        manifest
	configMap manifest
	services  []serviceManifest
	kinds     []string // of every object in the file, in order
}

// The DaemonSet examples: the plain one and the fleet variant.
const (
	plainExample = "examples/daemonset.yaml"
	fleetExample = "examples/daemonset-fleet.yaml"
)

var docSeparator = regexp.MustCompile(`(?m)^---[ \t]*$`)

func loadDaemonSet(t *testing.T) example { return loadExample(t, plainExample) }

// loadExample decodes every object of a DaemonSet example, each strictly by its kind.
func loadExample(t *testing.T, file string) example {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot(t), file))
	if err != nil {
		t.Fatal(err)
	}
	var ex example
	for _, doc := range docSeparator.Split(string(b), -1) {
		var head struct {
			Kind string `yaml:"kind"`
		}
		if err := yaml.Unmarshal([]byte(doc), &head); err != nil {
			t.Fatalf("%s: %v", file, err)
		}
		if head.Kind == "" {
			if strings.TrimSpace(doc) != "" && !onlyComments(doc) {
				t.Errorf("%s: an object without a kind:\n%s", file, doc)
			}
			continue
		}
		ex.kinds = append(ex.kinds, head.Kind)
		switch head.Kind {
		case "DaemonSet", "ConfigMap":
			var m manifest
			if err := yaml.UnmarshalWithOptions([]byte(doc), &m, yaml.DisallowUnknownField()); err != nil {
				t.Fatalf("%s: %s: %v", file, head.Kind, err)
			}
			if head.Kind == "DaemonSet" {
				ex.ds = m
			} else {
				ex.configMap = m
			}
		case "Service":
			var m serviceManifest
			if err := yaml.UnmarshalWithOptions([]byte(doc), &m, yaml.DisallowUnknownField()); err != nil {
				t.Fatalf("%s: Service: %v", file, err)
			}
			ex.services = append(ex.services, m)
		default:
			t.Errorf("%s: unexpected kind %q", file, head.Kind)
		}
	}
	if ex.ds.Kind == "" || ex.ds.Spec == nil {
		t.Fatalf("%s has no DaemonSet", file)
	}
	return ex
}

func onlyComments(doc string) bool {
	for _, l := range strings.Split(doc, "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
			return false
		}
	}
	return true
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

// TestDaemonSetExample checks both DaemonSet examples against what the daemon and
// Kubernetes accept; TestFleetDaemonSetExample checks what only the fleet variant has.
func TestDaemonSetExample(t *testing.T) {
	for _, file := range []string{plainExample, fleetExample} {
		t.Run(filepath.Base(file), func(t *testing.T) { checkDaemonSet(t, loadExample(t, file)) })
	}
}

func checkDaemonSet(t *testing.T, ex example) {
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

	rewrite := func(c container, env map[string]string, a string) string {
		return rewriteArg(c, vols, env, ports, a)
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
	env := containerEnv(t, main, "127.0.0.1") // the node IP; loopback here
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

// rewriteArg maps an argument of container c from the container's view to the test's:
// $(VAR) from env, mount paths to the volumes' directories vols, and ports (":5000") to
// the test's own.
func rewriteArg(c container, vols, env, ports map[string]string, a string) string {
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

// containerEnv is c's environment as kubelet sets it on a node with IP nodeIP (the node's
// name is made from it).
func containerEnv(t *testing.T, c container, nodeIP string) map[string]string {
	t.Helper()
	env := map[string]string{}
	for _, e := range c.Env {
		switch {
		case e.ValueFrom == nil:
			env[e.Name] = e.Value
		case e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "status.hostIP":
			env[e.Name] = nodeIP
		case e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "spec.nodeName":
			env[e.Name] = "node-" + strings.ReplaceAll(nodeIP, ".", "-")
		case e.ValueFrom.ResourceFieldRef != nil && e.ValueFrom.ResourceFieldRef.Resource == "limits.memory":
			env[e.Name] = strconv.FormatInt(quantityBytes(t, c.Resources.Limits["memory"]), 10)
		default:
			t.Fatalf("env %s: unsupported valueFrom", e.Name)
		}
	}
	return env
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

// TestFleetDaemonSetExample (issue 13) checks what the fleet variant adds: the peer API
// and gossip on the node IP from the downward API, --join through a headless Service
// that selects the pods, the key only ever a file from a Secret that its owner alone can
// read, never an env var, an object in the file, or part of the image.
func TestFleetDaemonSetExample(t *testing.T) {
	ex := loadExample(t, fleetExample)
	pod := ex.ds.pod()
	main := pod.Containers[0]
	argv := append(slices.Clone(main.Command), main.Args...)

	// The node IP comes from the downward API.
	var nodeIPVar string
	for _, e := range main.Env {
		if e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "status.hostIP" {
			nodeIPVar = "$(" + e.Name + ")"
		}
	}
	if nodeIPVar == "" {
		t.Fatal("no env var takes the node IP from the downward API (status.hostIP)")
	}
	ports := map[string]string{}
	for _, f := range []string{"--peer-listen", "--peer-advertise", "--gossip-listen"} {
		host, port, err := net.SplitHostPort(flagValue(argv, f))
		if err != nil || host != nodeIPVar {
			t.Errorf("%s %q: want %s:PORT, the node IP the others dial", f, flagValue(argv, f), nodeIPVar)
		}
		ports[f] = port
	}
	if ports["--peer-listen"] != ports["--peer-advertise"] {
		t.Errorf("--peer-advertise port %s differs from --peer-listen's %s", ports["--peer-advertise"], ports["--peer-listen"])
	}
	if !pod.HostNetwork {
		t.Error("hostNetwork is not true: the node IP would not be the pod's")
	}
	// A hostNetwork pod resolves cluster names (the Service) only with this policy.
	if pod.DNSPolicy != "ClusterFirstWithHostNet" {
		t.Errorf("dnsPolicy %q: --join names a Service, which a hostNetwork pod resolves only with ClusterFirstWithHostNet", pod.DNSPolicy)
	}
	declared := map[string]bool{}
	for _, p := range main.Ports {
		declared[fmt.Sprintf("%d/%s", p.ContainerPort, p.Protocol)] = true
	}
	gossip, peer := ports["--gossip-listen"], ports["--peer-listen"]
	for _, want := range []string{gossip + "/TCP", gossip + "/UDP", peer + "/TCP"} {
		if !declared[want] {
			t.Errorf("the container does not declare port %s", want)
		}
	}

	// --join names the headless Service, at the gossip port.
	if len(ex.services) != 1 {
		t.Fatalf("want one Service (the members' rendezvous), have %d", len(ex.services))
	}
	svc := ex.services[0]
	joinHost, joinPort, err := net.SplitHostPort(flagValue(argv, "--join"))
	if err != nil {
		t.Fatalf("--join %q: %v", flagValue(argv, "--join"), err)
	}
	if want := svc.Metadata.Name + "." + svc.Metadata.Namespace + ".svc.cluster.local"; joinHost != want || joinPort != gossip {
		t.Errorf("--join %s:%s, want the Service's name %s at the gossip port %s", joinHost, joinPort, want, gossip)
	}
	if svc.Metadata.Namespace != ex.ds.Metadata.Namespace {
		t.Errorf("the Service is in %q, the DaemonSet in %q", svc.Metadata.Namespace, ex.ds.Metadata.Namespace)
	}
	if svc.Spec.ClusterIP != "None" {
		t.Errorf("Service clusterIP %q: want None (headless), so its name resolves to every pod", svc.Spec.ClusterIP)
	}
	if !svc.Spec.PublishNotReadyAddresses {
		t.Error("the Service does not publish pods before they are ready: the first members could not find each other while starting")
	}
	if len(svc.Spec.Selector) == 0 {
		t.Error("the Service selects nothing")
	}
	for k, v := range svc.Spec.Selector {
		if ex.ds.Spec.Template.Metadata.Labels[k] != v {
			t.Errorf("the Service's selector %s=%s does not match the pods", k, v)
		}
	}
	svcPorts := map[string]bool{}
	for _, p := range svc.Spec.Ports {
		svcPorts[fmt.Sprintf("%d/%s", p.Port, p.Protocol)] = true
	}
	for _, want := range []string{gossip + "/TCP", gossip + "/UDP", peer + "/TCP"} {
		if !svcPorts[want] {
			t.Errorf("the Service does not list port %s", want)
		}
	}

	// The key: a file from a Secret, readable by its owner only, mounted read-only into
	// the mirror and nowhere else.
	keyFile := flagValue(argv, "--fleet-key-file")
	var keyMount string
	for _, m := range main.VolumeMounts {
		if strings.HasPrefix(keyFile, m.MountPath+"/") {
			keyMount = m.Name
			if !m.ReadOnly {
				t.Errorf("the key's volume %s is mounted writable", m.Name)
			}
		}
	}
	v := pod.volume(keyMount)
	if v == nil || v.Secret == nil {
		t.Fatalf("--fleet-key-file %s is not on a Secret volume", keyFile)
	}
	switch m := v.Secret.DefaultMode; {
	case m == nil:
		t.Error("the key Secret sets no defaultMode: kubelet's default 0644 lets others read the key, and the daemon refuses it (want 256, 0400)")
	case *m&0o077 != 0:
		t.Errorf("the key Secret's defaultMode %04o lets group or others read the key; the daemon refuses that (want 256, 0400)", *m)
	}
	if sc := pod.SecurityContext; sc != nil && (sc.FSGroup != nil || len(sc.SupplementalGroups) > 0) {
		t.Error("the pod sets fsGroup or supplementalGroups: kubelet would make the key group-readable, and the daemon refuses it")
	}
	for _, c := range pod.InitContainers {
		for _, m := range c.VolumeMounts {
			if m.Name == keyMount {
				t.Errorf("init container %s mounts the fleet key; it does not need it", c.Name)
			}
		}
	}
	for _, c := range append(slices.Clone(pod.InitContainers), pod.Containers...) {
		for _, e := range c.Env {
			if e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil {
				t.Errorf("%s: env %s comes from Secret %s: the key goes in a file, never the environment", c.Name, e.Name, e.ValueFrom.SecretKeyRef.Name)
			}
		}
		for _, e := range c.EnvFrom {
			if e.SecretRef != nil {
				t.Errorf("%s: envFrom Secret %s: the key goes in a file, never the environment", c.Name, e.SecretRef.Name)
			}
		}
	}
	// The Secret is the operator's to create: a key in the example would be the same,
	// published key in every cluster that applies it, and re-applying would overwrite the
	// real one.
	if slices.Contains(ex.kinds, "Secret") {
		t.Error("the example holds a Secret: the key must be made per cluster (openssl rand -hex 32), not shipped")
	}
	// The image holds the binary and nothing else: the final stage of the Dockerfile copies
	// only what the build stage built.
	df, err := os.ReadFile(filepath.Join(repoRoot(t), "examples/Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	stages := strings.Split(string(df), "\nFROM ")
	for _, l := range strings.Split(stages[len(stages)-1], "\n") {
		if f := strings.Fields(l); len(f) > 0 && (strings.EqualFold(f[0], "COPY") || strings.EqualFold(f[0], "ADD")) {
			if len(f) != 4 || f[1] != "--from=build" || f[2] != "/out/node-mirror" {
				t.Errorf("examples/Dockerfile's image takes more than the binary: %q", l)
			}
		}
	}

	// The ConfigMap sets the chunk size every member must share.
	f := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(f, []byte(ex.configMap.Data["config.toml"]), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(f)
	if err != nil {
		t.Fatalf("the ConfigMap's config.toml: %v", err)
	}
	if !strings.Contains(ex.configMap.Data["config.toml"], "fetch_chunk_size") {
		t.Errorf("the ConfigMap does not pin fetch_chunk_size (now %v), the fleet's unit of ownership", cfg.Cache.FetchChunkSize)
	}
}

// TestFleetDaemonSetRuns (issue 13) runs the fleet variant's mirror container as kubelet
// would on two nodes, 127.0.0.2 and 127.0.0.3 (one loopback here, two node IPs to the
// daemons), in a mount namespace whose /etc/hosts resolves the headless Service's name
// to both, as cluster DNS would, and whose resolv.conf names only loopback. The key is a
// Secret volume laid out as kubelet lays it out (the file behind ..data symlinks, mode
// 0400). The two find each other through the Service's name, list each other alive at
// the node IPs and ports the example gives, and their peer APIs refuse a request that is
// not signed.
func TestFleetDaemonSetRuns(t *testing.T) {
	ex := loadExample(t, fleetExample)
	pod := ex.ds.pod()
	main := pod.Containers[0]
	argv := append(slices.Clone(main.Command), main.Args...)
	joinHost, _, err := net.SplitHostPort(flagValue(argv, "--join"))
	if err != nil {
		t.Fatal(err)
	}
	_, gossipPort, _ := net.SplitHostPort(flagValue(argv, "--gossip-listen"))
	_, peerPort, _ := net.SplitHostPort(flagValue(argv, "--peer-listen"))
	nodeIPs := []string{"127.0.0.2", "127.0.0.3"}

	etc := t.TempDir()
	hostsFile, resolvFile := filepath.Join(etc, "hosts"), filepath.Join(etc, "resolv.conf")
	hosts := "127.0.0.1 localhost\n"
	for _, ip := range nodeIPs {
		hosts += ip + " " + joinHost + "\n"
	}
	// memberlist asks the nameservers over TCP first: they must be loopback, where
	// nothing answers, so the name resolves from the hosts file.
	for f, data := range map[string]string{hostsFile: hosts, resolvFile: "nameserver 127.0.0.1\n"} {
		if err := os.WriteFile(f, []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	ns := testenv.NewMountNS(t, testenv.Mount{Source: hostsFile, Target: "/etc/hosts"}, testenv.Mount{Source: resolvFile, Target: "/etc/resolv.conf"})

	key := fleetKeyHex() // one Secret for every node
	// The same gossip and peer ports on both node IPs, as a DaemonSet has them.
	shared := map[string]string{gossipPort: sharedPort(t, nodeIPs), peerPort: sharedPort(t, nodeIPs)}
	type node struct {
		ip, name, mirrorURL string
		d                   *daemon
	}
	var nodes []node
	for _, ip := range nodeIPs {
		// The daemon binds port 0 where the example says 5000 and 9500, and says where.
		ports := maps.Clone(shared)
		ports["5000"], ports["9500"] = "0", "0"
		vols := map[string]string{}
		for _, v := range pod.Volumes {
			vols[v.Name] = t.TempDir()
			switch {
			case v.ConfigMap != nil:
				for k, data := range ex.configMap.Data {
					if err := os.WriteFile(filepath.Join(vols[v.Name], k), []byte(data), 0o644); err != nil {
						t.Fatal(err)
					}
				}
			case v.Secret != nil:
				writeSecretVolume(t, vols[v.Name], *v.Secret.DefaultMode, map[string]string{"key": key})
			}
		}
		env := containerEnv(t, main, ip)
		var args []string
		for _, a := range argv[1:] {
			args = append(args, rewriteArg(main, vols, env, ports, a))
		}
		ready := filepath.Join(t.TempDir(), "ready")
		args = append(args, "--ready-file", ready)
		name, cargs := nodeMirrorBin, args
		if os.Geteuid() == 0 { // as asContainer: root without capabilities
			name = needTool(t, "setpriv", "util-linux")
			cargs = append([]string{"--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--", nodeMirrorBin}, args...)
		}
		cmd := ns.Command(context.Background(), name, cargs...)
		cmd.Env = os.Environ()
		for k, v := range env {
			cmd.Env = append(cmd.Env, k+"="+v)
		}
		n := node{ip: ip, name: env["NODE_NAME"], d: startDaemon(t, cmd)}
		n.mirrorURL = "http://" + n.d.readyAddr(t, ready, 30*time.Second)
		waitStatus(t, n.mirrorURL+"/readyz", http.StatusOK, 30*time.Second)
		nodes = append(nodes, n)
	}

	// Each lists both alive, at the node IPs and the example's ports.
	deadline := time.Now().Add(time.Minute)
	for _, n := range nodes {
		for {
			out, err := exec.Command(nodeMirrorBin, "status", "--json", "--mirror-url", n.mirrorURL).Output()
			if err != nil {
				t.Fatalf("%s: status: %v", n.name, err)
			}
			var st struct {
				Fleet []struct {
					Name       string `json:"name"`
					GossipAddr string `json:"gossip_addr"`
					PeerAddr   string `json:"peer_addr"`
					State      string `json:"state"`
				} `json:"fleet"`
			}
			if err := json.Unmarshal(out, &st); err != nil {
				t.Fatalf("%s: status: %v\n%s", n.name, err, out)
			}
			var got, want []string
			for _, m := range st.Fleet {
				got = append(got, m.Name+" "+m.State+" "+m.GossipAddr+" "+m.PeerAddr)
			}
			for _, o := range nodes {
				want = append(want, o.name+" alive "+net.JoinHostPort(o.ip, shared[gossipPort])+" "+net.JoinHostPort(o.ip, shared[peerPort]))
			}
			if slices.Equal(got, want) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s lists %q, want %q", n.name, got, want)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	for _, n := range nodes {
		url := "http://" + net.JoinHostPort(n.ip, shared[peerPort]) + "/peer/v1/manifests/sha256:" + strings.Repeat("0", 64) + "?registry=docker.io&repo=library%2Fapp&hop=0"
		resp, err := http.Get(url)
		if err != nil {
			t.Fatalf("%s: peer API: %v", n.name, err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("%s: an unsigned peer request got %s, want 401", n.name, resp.Status)
		}
	}
	for _, n := range nodes {
		n.d.stop(t)
	}
}

// sharedPort is a TCP and UDP port free on every one of ips (for the moment).
func sharedPort(t *testing.T, ips []string) string {
	t.Helper()
	for range 50 {
		l, err := net.Listen("tcp", ips[0]+":0")
		if err != nil {
			t.Fatal(err)
		}
		_, port, _ := net.SplitHostPort(l.Addr().String())
		free := true
		var held []io.Closer
		for _, ip := range ips {
			if ip != ips[0] {
				c, err := net.Listen("tcp", net.JoinHostPort(ip, port))
				if err != nil {
					free = false
					break
				}
				held = append(held, c)
			}
			u, err := net.ListenPacket("udp", net.JoinHostPort(ip, port))
			if err != nil {
				free = false
				break
			}
			held = append(held, u)
		}
		l.Close()
		for _, c := range held {
			c.Close()
		}
		if free {
			return port
		}
	}
	t.Fatalf("no port free on all of %v", ips)
	return ""
}

// writeSecretVolume lays out a Secret volume as kubelet's atomic writer does: the files
// in a timestamped directory, ..data a symlink to it, and each name a symlink through
// ..data, the files with mode.
func writeSecretVolume(t *testing.T, dir string, mode int, files map[string]string) {
	t.Helper()
	ts := "..2026_01_01_00_00_00.000000001"
	if err := os.Mkdir(filepath.Join(dir, ts), 0o755); err != nil {
		t.Fatal(err)
	}
	for name, data := range files {
		f := filepath.Join(dir, ts, name)
		if err := os.WriteFile(f, []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(f, os.FileMode(mode)); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(filepath.Join("..data", name), filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink(ts, filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
}

// fleetKeyHex is a fresh key as `openssl rand -hex 32` prints it.
func fleetKeyHex() string {
	k := make([]byte, 32)
	rand.Read(k)
	return hex.EncodeToString(k) + "\n"
}
