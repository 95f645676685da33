// TodoMVC on this server's Todo-Backend API. The server is the source of
// truth: every change is sent first and the list is redrawn from the answer,
// so what the page shows is what is stored, and a reload (or another
// browser) shows the same list. Changes are sent one after another, in the
// order they were made.
(function () {
	'use strict';

	var API = 'todos';
	var todos = [];
	var editing = null; // id of the todo being edited
	var draft = '';
	var queue = Promise.resolve();

	function $(selector) { return document.querySelector(selector); }
	var newTodo = $('.new-todo');
	var main = $('.main');
	var list = $('.todo-list');
	var toggleAll = $('.toggle-all');
	var footer = $('.footer');
	var count = $('.todo-count');
	var clearCompleted = $('.clear-completed');
	var status = $('.sync-status');

	function call(method, url, body) {
		var init = { method: method, credentials: 'same-origin', headers: {} };
		if (body !== undefined) {
			init.headers['Content-Type'] = 'application/json';
			init.body = JSON.stringify(body);
		}
		return fetch(url, init).then(function (res) {
			if (res.status === 204) { return null; }
			return res.json().catch(function () { return {}; }).then(function (data) {
				if (!res.ok) { throw new Error(data.message || ('HTTP ' + res.status)); }
				return data;
			});
		});
	}

	function say(text) { status.textContent = text || ''; }

	// Runs changes one at a time; a failure is shown and the list reloaded,
	// so the page never pretends something was saved that was not.
	function change(work) {
		queue = queue.then(work).then(function () { say(''); }, function (err) {
			say('Not saved: ' + err.message);
			return load();
		});
		return queue;
	}

	function load() {
		return call('GET', API).then(function (data) {
			todos = data;
			render();
		}, function (err) {
			say('Could not load the list (' + err.message + '); retrying.');
			return new Promise(function (resolve) { setTimeout(resolve, 1000); }).then(load);
		});
	}

	function replace(todo) {
		todos = todos.map(function (t) { return t.id === todo.id ? todo : t; });
	}

	function forget(id) {
		todos = todos.filter(function (t) { return t.id !== id; });
	}

	function filter() {
		var hash = location.hash;
		if (hash === '#/active') { return 'active'; }
		if (hash === '#/completed') { return 'completed'; }
		return 'all';
	}

	function item(todo) {
		var li = document.createElement('li');
		li.dataset.id = String(todo.id);
		if (todo.completed) { li.classList.add('completed'); }
		var view = document.createElement('div');
		view.className = 'view';
		var toggle = document.createElement('input');
		toggle.className = 'toggle';
		toggle.type = 'checkbox';
		toggle.checked = todo.completed;
		var label = document.createElement('label');
		label.textContent = todo.title;
		var destroy = document.createElement('button');
		destroy.className = 'destroy';
		view.append(toggle, label, destroy);
		li.append(view);
		if (editing === todo.id) {
			li.classList.add('editing');
			var edit = document.createElement('input');
			edit.className = 'edit';
			edit.value = draft;
			li.append(edit);
		}
		return li;
	}

	function render() {
		var shown = filter();
		var visible = todos.filter(function (t) {
			return shown === 'all' || (shown === 'active' ? !t.completed : t.completed);
		});
		list.replaceChildren.apply(list, visible.map(item));
		var active = todos.filter(function (t) { return !t.completed; }).length;
		main.hidden = footer.hidden = todos.length === 0;
		toggleAll.checked = todos.length > 0 && active === 0;
		var strong = document.createElement('strong');
		strong.textContent = String(active);
		count.replaceChildren(strong, document.createTextNode(active === 1 ? ' item left' : ' items left'));
		clearCompleted.hidden = active === todos.length;
		document.querySelectorAll('.filters a').forEach(function (a) {
			a.classList.toggle('selected', a.getAttribute('href') === (shown === 'all' ? '#/' : '#/' + shown));
		});
		var input = list.querySelector('li.editing .edit');
		if (input && document.activeElement !== input) {
			input.focus();
			input.setSelectionRange(input.value.length, input.value.length);
		}
	}

	function idOf(node) {
		var li = node.closest('li');
		return li ? Number(li.dataset.id) : null;
	}

	function finishEditing(id, save) {
		if (editing !== id) { return; }
		var input = list.querySelector('li.editing .edit');
		if (input) { draft = input.value; }
		var title = draft.trim();
		editing = null;
		render();
		if (!save) { return; }
		var todo = todos.find(function (t) { return t.id === id; });
		if (!todo) { return; }
		if (title === '') {
			change(function () { return call('DELETE', API + '/' + id).then(function () { forget(id); render(); }); });
		} else if (title !== todo.title) {
			change(function () {
				return call('PATCH', API + '/' + id, { title: title }).then(function (t) { replace(t); render(); });
			});
		}
	}

	newTodo.addEventListener('keydown', function (e) {
		if (e.key !== 'Enter') { return; }
		var title = newTodo.value.trim();
		newTodo.value = '';
		if (!title) { return; }
		change(function () {
			return call('POST', API, { title: title }).then(function (t) { todos.push(t); render(); }, function (err) {
				if (!newTodo.value) { newTodo.value = title; }
				throw err;
			});
		});
	});

	list.addEventListener('change', function (e) {
		if (!e.target.classList.contains('toggle')) { return; }
		var id = idOf(e.target);
		var completed = e.target.checked;
		change(function () {
			return call('PATCH', API + '/' + id, { completed: completed }).then(function (t) { replace(t); render(); });
		});
	});

	list.addEventListener('click', function (e) {
		if (!e.target.classList.contains('destroy')) { return; }
		var id = idOf(e.target);
		change(function () { return call('DELETE', API + '/' + id).then(function () { forget(id); render(); }); });
	});

	list.addEventListener('dblclick', function (e) {
		if (e.target.tagName !== 'LABEL') { return; }
		var id = idOf(e.target);
		var todo = todos.find(function (t) { return t.id === id; });
		if (!todo) { return; }
		editing = id;
		draft = todo.title;
		render();
	});

	list.addEventListener('input', function (e) {
		if (e.target.classList.contains('edit')) { draft = e.target.value; }
	});

	list.addEventListener('keydown', function (e) {
		if (!e.target.classList.contains('edit')) { return; }
		if (e.key === 'Enter') { finishEditing(idOf(e.target), true); }
		if (e.key === 'Escape') { finishEditing(idOf(e.target), false); }
	});

	list.addEventListener('focusout', function (e) {
		if (e.target.classList.contains('edit')) { finishEditing(idOf(e.target), true); }
	});

	toggleAll.addEventListener('change', function () {
		var completed = toggleAll.checked;
		change(function () {
			return Promise.all(todos.filter(function (t) { return t.completed !== completed; }).map(function (t) {
				return call('PATCH', API + '/' + t.id, { completed: completed }).then(replace);
			})).then(render, function (err) { render(); throw err; });
		});
	});

	clearCompleted.addEventListener('click', function () {
		change(function () {
			return Promise.all(todos.filter(function (t) { return t.completed; }).map(function (t) {
				return call('DELETE', API + '/' + t.id).then(function () { forget(t.id); });
			})).then(render, function (err) { render(); throw err; });
		});
	});

	window.addEventListener('hashchange', render);
	// Changes queue up behind the first load, so it cannot overwrite them.
	queue = load();
}());
