// Krest web console: plain DOM, no framework, no build step. Every value is rendered as
// text (textContent / text nodes), never as HTML. Talks to /api/v1 with the session cookie;
// writes send the session's CSRF token in X-Krest-Csrf.
'use strict';

let csrf = null;
let access = null;
let live = null; // the open EventSource of a run page

function h(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (k === 'class') e.className = v;
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of kids.flat()) {
    if (c === undefined || c === null) continue;
    e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

class ApiError extends Error {
  constructor(status, error) {
    super((error && error.message) || ('HTTP ' + status));
    this.status = status;
    this.field = error && error.field;
    this.invalid = (error && error.invalid) || [];
  }
}

async function api(method, path, body) {
  const headers = {};
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (method !== 'GET' && csrf) headers['X-Krest-Csrf'] = csrf;
  const r = await fetch('/api/v1' + path, {
    method, headers, credentials: 'same-origin',
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) {
    if (r.status === 401 && path !== '/session') showLogin();
    throw new ApiError(r.status, data.error);
  }
  return data;
}

const q = (params) => {
  const s = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== '') s.set(k, v);
  const t = s.toString();
  return t ? '?' + t : '';
};
const enc = encodeURIComponent;
const fmt = (t) => (t ? new Date(t).toLocaleString() : '-');
const ago = (t) => (t ? Math.max(0, Math.round((Date.now() - new Date(t)) / 1000)) + ' s ago' : '-');
const statusCell = (s) => h('span', { class: 'status ' + s }, s);
// The notice of a run answer from a node whose database is behind the events stream.
const catchingUp = (c) => (c ? h('p', { class: 'notice', id: 'catching-up' },
  'Node ' + c.node + ' is catching up on the events stream: ' + c.lagEvents + ' events (' +
  Math.round(c.lagMs / 1000) + ' s) behind; recent runs may be missing or out of date.') : null);
const jobStatus = (spec) => (spec.running ? h('span', { class: 'status RUNNING-job' }, 'RUNNING') : h('span', { class: 'status PAUSED-job' }, 'PAUSED'));
const schedule = (spec) => spec.cron ? spec.cron + ' (' + (spec.timeZone || 'UTC') + ')' : spec.every ? 'every ' + spec.every : spec.at ? 'at ' + spec.at : 'manual';
const view = () => document.getElementById('view');
const canWrite = () => access === 'write';

function table(headers, rows, empty) {
  if (!rows.length) return h('p', { class: 'muted' }, empty || 'Nothing yet.');
  return h('table', {}, h('thead', {}, h('tr', {}, headers.map((x) => h('th', {}, x)))),
    h('tbody', {}, rows.map((r) => h('tr', {}, r.map((c) => h('td', {}, c))))));
}

function showError(e) {
  view().replaceChildren(h('p', { class: 'error', id: 'page-error' }, e.message));
}

// --- Session -------------------------------------------------------------------------------

function showLogin() {
  csrf = null; access = null;
  closeLive();
  document.getElementById('nav').hidden = true;
  view().replaceChildren();
  document.getElementById('login').hidden = false;
}

function loggedIn(session) {
  csrf = session.csrf; access = session.access;
  document.getElementById('login').hidden = true;
  document.getElementById('nav').hidden = false;
  document.getElementById('who').textContent =
    access === 'write' ? 'read & write' : access === 'anonymous' ? 'anonymous, read only' : 'read only';
  // Anonymous: the button logs in (for writes) instead of out.
  document.getElementById('logout').textContent = access === 'anonymous' ? 'Log in' : 'Log out';
}

async function login(ev) {
  ev.preventDefault();
  const err = document.getElementById('login-error');
  err.textContent = '';
  try {
    const token = document.getElementById('token').value;
    loggedIn(await api('POST', '/session', { token }));
    document.getElementById('token').value = '';
    route();
  } catch (e) {
    err.textContent = e.message;
  }
}

async function logout() {
  try { await api('DELETE', '/session'); } catch (e) { /* gone already */ }
  location.hash = '#/';
  showLogin();
}

// --- Pages ---------------------------------------------------------------------------------

async function dashboard() {
  const [cluster, jobs, hour, failed, workers] = await Promise.all([
    api('GET', '/cluster'), api('GET', '/jobs'), api('GET', '/runs/counts?since=1h'),
    api('GET', '/runs?status=FAILED&limit=5'), api('GET', '/workers'),
  ]);
  // Counted by the node's database, however many runs the hour had.
  const counts = hour.counts;
  const running = jobs.items.filter((j) => j.spec.running).length;
  const card = (n, l, id) => h('div', { class: 'card', id }, h('div', { class: 'n' }, n), h('div', { class: 'l' }, l));
  const leader = cluster.cluster.leader ? cluster.cluster.leader.node : 'none';
  view().replaceChildren(
    h('h1', {}, 'Dashboard'),
    h('div', { class: 'cards' },
      card(jobs.items.length, running + ' running, ' + (jobs.items.length - running) + ' paused', 'card-jobs'),
      card(leader, 'leader of ' + cluster.cluster.nodes.length + ' node(s)', 'card-leader'),
      card(workers.items.length, 'worker instance(s)', 'card-workers'),
      card(cluster.node.recorder.lagEvents, 'events not recorded yet on ' + cluster.node.node, 'card-lag')),
    h('h2', {}, 'Runs of the last hour'),
    h('div', { class: 'cards', id: 'runs-by-status' },
      ['SUCCEEDED', 'FAILED', 'TIMED_OUT', 'RUNNING', 'PENDING', 'SKIPPED', 'CANCELLED']
        .map((s) => h('div', { class: 'card' }, h('div', { class: 'n ' + s }, counts[s] || 0), h('div', { class: 'l' }, s)))),
    h('h2', {}, 'Recent failures'),
    runTable(failed.items, 'No failed runs.'),
    h('h2', {}, 'Workers'),
    workerTable(workers.items));
}

function runTable(runs, empty) {
  return table(['Run', 'Job', 'Status', 'Trigger', 'Scheduled', 'Shards', 'Attempts', 'Error'],
    runs.map((r) => [
      h('a', { href: '#/runs/' + enc(r.runId) }, r.runId),
      h('a', { href: '#/jobs/' + enc(r.jobGroup + '.' + r.jobName) }, r.jobGroup + '.' + r.jobName),
      statusCell(r.status), r.trigger || '-', fmt(r.scheduledAt),
      r.shardsSucceeded + '/' + r.shardTotal, r.attempts, r.error || '']), empty);
}

function workerTable(workers) {
  return table(['Instance', 'App', 'Handlers', 'Weight', 'Slots', 'In flight', 'Heartbeat'],
    workers.map((w) => [w.instance, w.appName, w.handlers.join(', '), w.weight, w.slots, w.inFlight, ago(w.heartbeatAt)]),
    'No live workers.');
}

async function jobsPage(params) {
  const search = h('input', { id: 'job-search', type: 'search', placeholder: 'Search jobs', value: params.get('search') || '' });
  const status = h('select', { id: 'job-status' },
    ['', 'RUNNING', 'PAUSED'].map((s) => h('option', { value: s, selected: params.get('status') === s }, s || 'any status')));
  const list = h('div', { id: 'job-list' });
  let timer = null;
  const load = async () => {
    const page = await api('GET', '/jobs' + q({ search: search.value, status: status.value }));
    list.replaceChildren(table(['Job', 'App', 'Schedule', 'Status', 'Next fire'],
      page.items.map((j) => [h('a', { href: '#/jobs/' + enc(j.key) }, j.key), j.spec.appName, schedule(j.spec), jobStatus(j.spec), fmt(j.nextFireAt)]),
      'No jobs match.'));
  };
  search.addEventListener('input', () => { clearTimeout(timer); timer = setTimeout(load, 200); });
  status.addEventListener('change', load);
  view().replaceChildren(h('h1', {}, 'Jobs'), h('div', { class: 'toolbar' }, search, status,
    canWrite() ? h('a', { href: '#/new' }, 'New job') : null), list);
  await load();
}

async function previewInto(target, expr, tz, count) {
  const p = await api('GET', '/cron/preview' + q({ expr, tz, count }));
  target.replaceChildren(h('ul', {}, p.local.map((t) => h('li', {}, t))));
}

async function jobPage(key) {
  const job = await api('GET', '/jobs/' + enc(key));
  const runs = await api('GET', '/runs' + q({ job: key, limit: 100 }));
  const ended = runs.items.filter((r) => ['SUCCEEDED', 'FAILED', 'TIMED_OUT', 'CANCELLED'].includes(r.status));
  const ok = ended.filter((r) => r.status === 'SUCCEEDED').length;
  const rate = ended.length ? Math.round((100 * ok) / ended.length) + '% of the last ' + ended.length + ' ended runs' : 'no ended runs yet';
  const fires = h('div', { id: 'next-fires' }, job.nextFireAt ? fmt(job.nextFireAt) : '-');
  if (job.spec.cron && job.spec.running) previewInto(fires, job.spec.cron, job.spec.timeZone || 'UTC', 5).catch(() => {});
  const msg = h('p', { id: 'job-message' });
  const act = (label, id, fn, cls) => h('button', { id, type: 'button', class: cls, onclick: async () => {
    msg.className = ''; msg.textContent = '';
    try { await fn(); } catch (e) { msg.className = 'error'; msg.textContent = e.message; }
  } }, label);
  const args = h('textarea', { id: 'trigger-args', placeholder: 'args for this run (JSON, optional)' });
  const actions = canWrite() ? h('div', { class: 'toolbar' },
    h('a', { href: '#/edit/' + enc(key), id: 'edit-job' }, 'Edit'),
    job.spec.running
      ? act('Pause', 'pause-job', async () => { await api('POST', '/jobs/' + enc(key) + '/pause'); route(); })
      : act('Resume', 'resume-job', async () => { await api('POST', '/jobs/' + enc(key) + '/resume'); route(); }),
    act('Trigger now', 'trigger-job', async () => {
      const text = args.value.trim();
      let body = {};
      if (text) { try { body.args = JSON.parse(text); } catch (e) { body.args = text; } }
      const r = await api('POST', '/jobs/' + enc(key) + '/trigger', body);
      location.hash = '#/runs/' + enc(r.runId);
    }),
    act('Delete', 'delete-job', async () => {
      if (!confirm('Delete job ' + key + '? Its runs stay in the history.')) return;
      await api('DELETE', '/jobs/' + enc(key));
      location.hash = '#/jobs';
    }, 'danger')) : null;
  view().replaceChildren(
    h('h1', {}, key, ' ', jobStatus(job.spec)),
    actions, canWrite() ? args : null, msg,
    h('p', {}, 'Schedule: ', schedule(job.spec), ' · revision ', job.revision, ' · success rate: ', h('span', { id: 'success-rate' }, rate)),
    h('h2', {}, 'Next fire times'), fires,
    h('h2', {}, 'Recent runs'), runTable(runs.items.slice(0, 20), 'No runs yet.'),
    h('h2', {}, 'Definition'), h('pre', { id: 'definition' }, JSON.stringify(job.spec, null, 2)));
}

const FORM_FIELDS = ['appName', 'jobGroup', 'jobName', 'path', 'jobType', 'cron', 'timeZone'];

async function jobForm(key) {
  const base = key ? (await api('GET', '/jobs/' + enc(key))).spec : { jobGroup: 'default', jobType: 'NORMAL', timeZone: 'UTC', running: true };
  const input = (name, label, attrs) => h('label', {}, label, h('input', Object.assign({ id: 'f-' + name, name, value: base[name] || '' }, attrs || {})));
  const extra = {};
  for (const [k, v] of Object.entries(base)) if (!FORM_FIELDS.includes(k) && k !== 'args' && k !== 'running') extra[k] = v;
  const type = h('select', { id: 'f-jobType' }, ['NORMAL', 'SHARDING', 'BROADCAST', 'HTTP'].map((t) => h('option', { value: t, selected: base.jobType === t }, t)));
  const cronError = h('p', { id: 'cron-error', class: 'error' });
  const preview = h('div', { id: 'cron-preview' });
  const formError = h('div', { id: 'form-error', class: 'error' });
  const argsBox = h('textarea', { id: 'f-args' }, base.args === undefined ? '' : (typeof base.args === 'string' ? base.args : JSON.stringify(base.args)));
  const extraBox = h('textarea', { id: 'f-extra' }, JSON.stringify(extra, null, 2));
  const running = h('input', { id: 'f-running', type: 'checkbox', checked: base.running !== false });
  const form = h('form', { class: 'job', id: 'job-form' },
    input('appName', 'App', { required: true }), input('jobGroup', 'Group'),
    input('jobName', 'Name', { required: true, readonly: key ? true : undefined }),
    input('path', 'Handler path'), h('label', {}, 'Type', type),
    input('cron', 'Cron (Quartz with seconds, or 5 fields)', { autocomplete: 'off' }), cronError,
    input('timeZone', 'Time zone'), h('h2', {}, 'Next fire times'), preview,
    h('label', {}, 'Args (JSON or text)', argsBox),
    h('label', {}, running, ' running'),
    h('label', {}, 'Other fields (JSON)', extraBox),
    h('button', { type: 'submit', id: 'save-job' }, key ? 'Save' : 'Create'), formError);
  let timer = null;
  const check = () => {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      const expr = form.querySelector('#f-cron').value.trim();
      const tz = form.querySelector('#f-timeZone').value.trim() || 'UTC';
      cronError.textContent = '';
      if (!expr) { preview.replaceChildren(h('p', { class: 'muted' }, 'No cron: the job runs on `every`, `at` or by hand.')); return; }
      try { await previewInto(preview, expr, tz, 5); } catch (e) { preview.replaceChildren(); cronError.textContent = e.message; }
    }, 150);
  };
  form.querySelector('#f-cron').addEventListener('input', check);
  form.querySelector('#f-timeZone').addEventListener('input', check);
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    formError.replaceChildren();
    let doc;
    try { doc = JSON.parse(extraBox.value || '{}'); } catch (e) { formError.textContent = 'Other fields: ' + e.message; return; }
    for (const f of FORM_FIELDS) {
      const el = form.querySelector('#f-' + f);
      const v = el.value.trim();
      if (v) doc[f] = v; else delete doc[f];
    }
    const a = argsBox.value.trim();
    if (a) { try { doc.args = JSON.parse(a); } catch (e) { doc.args = a; } }
    doc.running = running.checked;
    try {
      let saved;
      if (key) saved = await api('PUT', '/jobs/' + enc(key), doc);
      else saved = (await api('POST', '/jobs', doc)).results[0];
      location.hash = '#/jobs/' + enc(saved.job);
    } catch (e) {
      formError.append(h('p', {}, e.message));
      for (const d of e.invalid) for (const p of d.problems) formError.append(h('p', {}, (p.field ? p.field + ': ' : '') + p.message));
    }
  });
  view().replaceChildren(h('h1', {}, key ? 'Edit ' + key : 'New job'), form);
  check();
}

async function runsPage(params) {
  const job = h('input', { id: 'run-job', placeholder: 'job (group.name)', value: params.get('job') || '' });
  const status = h('select', { id: 'run-status' },
    ['', 'PENDING', 'RUNNING', 'SUCCEEDED', 'FAILED', 'TIMED_OUT', 'SKIPPED', 'CANCELLED']
      .map((s) => h('option', { value: s, selected: params.get('status') === s }, s || 'any status')));
  const list = h('div', { id: 'run-list' });
  const more = h('button', { type: 'button', id: 'more-runs', hidden: true }, 'More');
  let next = null;
  const load = async (append) => {
    const page = await api('GET', '/runs' + q({ job: job.value.trim(), status: status.value, limit: 50, cursor: append ? next : '' }));
    next = page.next || null;
    more.hidden = !next;
    const rows = append ? (list._runs || []).concat(page.items) : page.items;
    list._runs = rows;
    list.replaceChildren(...[catchingUp(page.catchingUp), runTable(rows, 'No runs match.')].filter(Boolean));
  };
  const reload = () => load(false).catch((e) => list.replaceChildren(h('p', { class: 'error' }, e.message)));
  job.addEventListener('change', reload);
  status.addEventListener('change', reload);
  more.addEventListener('click', () => load(true));
  view().replaceChildren(h('h1', {}, 'Runs'), h('div', { class: 'toolbar' }, job, status), list, more);
  await load(false);
}

function closeLive() {
  if (live) { live.close(); live = null; }
}

async function runPage(id) {
  // A run just triggered may not be recorded yet: wait for it a little.
  let detail = null;
  for (let i = 0; ; i++) {
    try { detail = await api('GET', '/runs/' + enc(id)); break; } catch (e) {
      if (e.status !== 404 || i >= 40) throw e;
      view().replaceChildren(h('p', { class: 'muted' }, 'Waiting for run ' + id + ' to be recorded…'));
      await new Promise((r) => setTimeout(r, 250));
      if (location.hash !== '#/runs/' + enc(id)) return;
    }
  }
  const render = (d) => {
    const r = d.run;
    const done = r.shardsSucceeded + r.shardsFailed;
    const attempts = d.attempts.map((a) => h('div', { class: 'attempt' },
      h('h2', {}, 'Shard ' + a.shard + ', attempt ' + a.attempt + ' ', statusCell(a.status), ' on ', a.worker || '-'),
      a.error ? h('p', { class: 'error' }, a.error) : null,
      a.output ? h('p', {}, 'Output: ', a.output) : null,
      h('div', { class: 'logs', 'data-attempt': a.shard + '.' + a.attempt },
        a.logs.map((l) => h('div', { class: 'log-line' }, l.at.slice(11, 23) + ' ' + l.level + ' ' + l.line)))));
    return h('div', { id: 'run-detail' },
      h('h1', {}, 'Run ', r.runId),
      catchingUp(d.catchingUp),
      h('p', {}, 'Job ', h('a', { href: '#/jobs/' + enc(r.jobGroup + '.' + r.jobName) }, r.jobGroup + '.' + r.jobName),
        ' · ', h('span', { id: 'run-status', class: 'status ' + r.status }, r.status), ' · trigger ', r.trigger || '-',
        ' · scheduled ', fmt(r.scheduledAt), ' · finished ', fmt(r.finishedAt)),
      h('p', {}, 'Shards: ', h('progress', { max: r.shardTotal, value: done }), ' ', h('span', { id: 'shard-progress' }, r.shardsSucceeded + ' succeeded, ' + r.shardsFailed + ' failed of ' + r.shardTotal)),
      r.error ? h('p', { class: 'error' }, r.error) : null,
      d.args !== undefined ? h('p', {}, 'Args: ', JSON.stringify(d.args)) : null,
      canWrite() && !['SUCCEEDED', 'FAILED', 'TIMED_OUT', 'SKIPPED', 'CANCELLED'].includes(r.status)
        ? h('button', { type: 'button', id: 'cancel-run', class: 'danger', onclick: async () => { await api('POST', '/runs/' + enc(id) + '/cancel'); refresh(); } }, 'Cancel run') : null,
      h('h2', { id: 'live-title', hidden: r.status === 'SUCCEEDED' || r.status === 'FAILED' || r.status === 'TIMED_OUT' || r.status === 'SKIPPED' || r.status === 'CANCELLED' }, 'Live log'),
      h('div', { class: 'logs', id: 'live-log' }),
      attempts);
  };
  let current = render(detail);
  view().replaceChildren(current);
  const liveLog = [];
  const refresh = async () => {
    if (location.hash !== '#/runs/' + enc(id)) return;
    const d = await api('GET', '/runs/' + enc(id));
    const next = render(d);
    next.querySelector('#live-log').replaceChildren(...liveLog.map((n) => n.cloneNode(true)));
    current.replaceWith(next);
    current = next;
  };
  closeLive();
  if (['SUCCEEDED', 'FAILED', 'TIMED_OUT', 'SKIPPED', 'CANCELLED'].includes(detail.run.status)) return;
  const source = new EventSource('/api/v1/runs/' + enc(id) + '/events');
  live = source;
  let timer = null;
  const later = (ms) => { clearTimeout(timer); timer = setTimeout(() => refresh().catch(() => {}), ms); };
  source.addEventListener('log', (ev) => {
    const l = JSON.parse(ev.data);
    const line = h('div', { class: 'log-line' }, '[' + l.shard + '.' + l.attempt + '] ' + l.level + ' ' + l.line);
    liveLog.push(line);
    current.querySelector('#live-log').append(line.cloneNode(true));
  });
  for (const kind of ['dispatched', 'started', 'finished', 'skipped']) source.addEventListener(kind, () => later(300));
  source.addEventListener('end', () => {
    source.close();
    if (live === source) live = null;
    later(300);
    setTimeout(() => refresh().catch(() => {}), 1500);
  });
}

async function workersPage() {
  const w = await api('GET', '/workers');
  view().replaceChildren(h('h1', {}, 'Workers'), workerTable(w.items));
}

// --- Routing -------------------------------------------------------------------------------

async function route() {
  if (!access) return;
  closeLive();
  const [path, query] = (location.hash.slice(1) || '/').split('?');
  const params = new URLSearchParams(query || '');
  const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  try {
    if (parts.length === 0) await dashboard();
    else if (parts[0] === 'jobs' && parts.length === 1) await jobsPage(params);
    else if (parts[0] === 'jobs') await jobPage(parts[1]);
    else if (parts[0] === 'new') await jobForm(null);
    else if (parts[0] === 'edit') await jobForm(parts[1]);
    else if (parts[0] === 'runs' && parts.length === 1) await runsPage(params);
    else if (parts[0] === 'runs') await runPage(parts[1]);
    else if (parts[0] === 'workers') await workersPage();
    else view().replaceChildren(h('p', {}, 'No such page.'));
  } catch (e) {
    if (e.status !== 401) showError(e);
  }
}

document.addEventListener('DOMContentLoaded', async () => {
  document.getElementById('login-form').addEventListener('submit', login);
  document.getElementById('logout').addEventListener('click', logout);
  window.addEventListener('hashchange', route);
  try {
    loggedIn(await api('GET', '/session'));
    route();
  } catch (e) {
    showLogin();
  }
});
